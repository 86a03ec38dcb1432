"""Model Runner V2 (the GPU default): the plugin's model state.

Checked against vLLM 0.32 (read, not run: the CPU build has no MRv2 runner).
"""

import functools
from collections.abc import Mapping, Sequence

from ..state import MediaSpan, RequestInfo, RunnerBatch
from .runner_glue import ReducingModel, bind_to_runner, media_spans, request_overrides

# ------------------------------------------------------------- Model Runner V2


#
# MRv2 (the GPU default) offers models a per-request state through
# `get_model_state_cls()` (vllm/v1/worker/gpu/model_states, vLLM 0.32): `add_request` /
# `remove_request` see each request once, and `prepare_attn` runs before every forward
# with the batch, the block tables (manager blocks, batch order) and the attention groups.
# The state class below feeds the model the same `set_batch` / `bind_attention_groups`
# as the V1 glue (runner_glue.py). Not run here: the CPU build has no MRv2 runner (no GPU Triton).
@functools.cache
def model_state_cls() -> type:
    """The MRv2 model state of the plugin's model (made on first use: MRv2 modules are
    imported only where an MRv2 runner asks for it)."""
    from vllm.v1.worker.gpu.model_states.mamba_hybrid import MambaHybridModelState

    class StatefulReduceModelState(MambaHybridModelState):
        """vLLM's hybrid model state, plus: each request's prompt and reduction options
        (kept from `add_request` to `remove_request`), handed to the model with the
        batch before every forward; the attention groups, bound at the first batch."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.prompts: dict[str, tuple[list[int], dict | None, tuple[MediaSpan, ...]]] = {}

        def add_request(self, req_index: int, new_req_data) -> None:
            super().add_request(req_index, new_req_data)
            prompt = list(new_req_data.prompt_token_ids or ())
            features = new_req_data.mm_features
            self.prompts[new_req_data.req_id] = (prompt, request_overrides(features), media_spans(features))

        def remove_request(self, req_id: str) -> None:
            super().remove_request(req_id)
            self.prompts.pop(req_id, None)

        def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int):
            self.model.set_batch(RunnerBatch())  # dummy runs: the plain forward
            return super().prepare_dummy_inputs(num_reqs, num_tokens)

        def prepare_attn(self, input_batch, cudagraph_mode, block_tables, slot_mappings, attn_groups, *args, **kwargs):
            if not self.model.attention_groups_bound():
                bind_to_runner(self.model, attn_groups, self.model_config.get_vocab_size(), self.device)
            self.model.set_batch(mrv2_batch(input_batch, self.prompts, self.model, block_tables))
            return super().prepare_attn(
                input_batch, cudagraph_mode, block_tables, slot_mappings, attn_groups, *args, **kwargs
            )

    return StatefulReduceModelState


def mrv2_batch(
    input_batch,
    prompts: Mapping[str, tuple[list[int], dict | None, tuple[MediaSpan, ...]]],
    model: ReducingModel,
    block_tables: Sequence,
) -> RunnerBatch:
    """The batch of an MRv2 `InputBatch` (host arrays only); empty for a batch with a
    request the state never saw (a dummy run). EVS videos keep the prompt's first-frame
    layout here (MRv2's encoder cache is not read), so a request with one is served
    unreduced (`evs_layout_unknown`) rather than planned on the wrong rows."""
    if any(req_id not in prompts for req_id in input_batch.req_ids):
        return RunnerBatch()
    requests = []
    for i, req_id in enumerate(input_batch.req_ids):
        prompt, overrides, media = prompts[req_id]
        computed, scheduled = int(input_batch.num_computed_tokens_np[i]), int(input_batch.num_scheduled_tokens[i])
        config = model.request_config(overrides)
        requests.append(RequestInfo(req_id, len(prompt), config, computed, scheduled, prompt, media))
    return RunnerBatch(tuple(requests), tuple(block_tables), live=frozenset(prompts))
