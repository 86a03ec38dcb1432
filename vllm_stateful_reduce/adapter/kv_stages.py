"""KV blocks only for the rows each stage keeps: stage j's attention layers get blocks for
`num_tokens - dropped[j]` rows of a reduced request, not for its whole prompt.

Through vLLM's seams (checked against vLLM 0.32; docs/design/kv-memory.md has the read):

1. each stage's attention layers declare `StageFullAttentionSpec(stage=j)`
   (`declare_stage`), so vLLM's hybrid grouping gives every stage its own KV-cache group,
   and the runner a block table per stage, all drawing on one block pool;
2. `StageAttentionManager`, registered for that spec (`register_stage_spec`), sizes
   group j for the rows stage j holds, which `DropBook` tells it;
3. the scheduler (`stage_scheduler`, vLLM's `scheduler_cls`) predicts each request's
   drops when it arrives, with the planner's own function (`plan.prefill_drops`) on
   what the engine core holds: prompt ids, media positions, per-request options. The
   drops count only for a prefill scheduled whole in one step (the worker reduces only
   those); a preempted request decides again when it is recomputed.

Predicting fewer drops than the worker makes only wastes blocks; more would let stage j
write past the request's blocks. So the scheduler predicts none where it cannot read
what the worker reads (options of media kept out of the engine core by the shm cache;
no tokenizer), and the worker checks every step that each stage's rows fit the blocks
it was given (`stage_metadata.kv_bound_problem`). An EVS video's prompt holds its
retained count of visual rows in the engine core as in the worker (only their frames
differ), so its drops are predicted exactly.
"""

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec, replace_as
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from ..config import ReductionConfig, from_additional_config
from ..plan import PromptMarkers, prefill_drops
from ..schedule import Schedules
from ..state import MediaSpan, RequestInfo
from .runner_glue import request_overrides

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

SCHEDULER = f"{__name__}.stage_scheduler"  # vLLM's `scheduler_cls` while stages free KV


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------ the spec


@dataclass(frozen=True, kw_only=True)
class StageFullAttentionSpec(FullAttentionSpec):
    """A full-attention layer of reduction stage `stage`: layers of different stages
    never share a KV-cache group (each holds its own number of rows)."""

    stage: int = 0

    @classmethod
    def merge(cls, specs: list[KVCacheSpec]) -> "StageFullAttentionSpec":
        # vLLM's grouping merges a bucket's specs and takes an AssertionError as "keep
        # them apart"; FullAttentionSpec.merge rebuilds its own fields and would drop `stage`.
        stages = {spec.stage if isinstance(spec, StageFullAttentionSpec) else None for spec in specs}
        if len(stages) != 1 or None in stages:
            raise AssertionError(f"attention layers of different reduction stages {sorted(map(str, stages))}")
        return replace_as(FullAttentionSpec.merge(specs), cls, stage=stages.pop())

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(isinstance(s, StageFullAttentionSpec) and s.stage == self.stage for s in kv_cache_specs.values())


def declare_stage(attention: Any, stage: int) -> None:
    """Make one of vLLM's `Attention` layers declare stage `stage`'s spec (the runner
    asks each layer for its spec when it sizes the KV cache)."""
    declared = attention.get_kv_cache_spec

    @functools.wraps(declared)
    def get_kv_cache_spec(vllm_config: "VllmConfig") -> KVCacheSpec | None:
        spec = declared(vllm_config)
        if spec is None:
            return None
        if type(spec) is not FullAttentionSpec:
            raise ValueError(
                f"{attention.layer_name} declares {type(spec).__name__}: freeing dropped tokens' KV needs full "
                "attention (set stateful_reduce.free_dropped_kv to false)"
            )
        return replace_as(spec, StageFullAttentionSpec, stage=stage)

    attention.get_kv_cache_spec = get_kv_cache_spec


def register_stage_spec() -> None:
    """Register the spec with its manager, after vLLM's own specs: vLLM registers those
    lazily, on the first lookup, and not at all once anything else is registered."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        StageFullAttentionSpec, StageAttentionManager, uniform_type_base_spec=FullAttentionSpec
    )


# ------------------------------------------------------------------ scheduler side


@dataclass
class DropBook:
    """The scheduler's view of each request's drops (same dict of requests as the
    scheduler's, so a request's counts are read as the scheduler updates them)."""

    requests: Mapping[str, "Request"]
    predicted: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per stage, stage 0: 0
    reducing: set[str] = field(default_factory=set)  # whose blocks were allocated with the drops
    blocks_not_allocated: int = 0  # at admission, over all stage groups, since start
    on_not_allocated: Callable[[int], None] | None = None

    def rows(self, request_id: str, num_tokens: int, stage: int) -> int:
        """Rows stage `stage` holds when the request has `num_tokens` tokens."""
        drops = self.predicted.get(request_id)
        if not drops or not drops[stage] or not self._reduces(request_id, num_tokens):
            return num_tokens
        return num_tokens - drops[stage]

    def _reduces(self, request_id: str, num_tokens: int) -> bool:
        if request_id in self.reducing:
            return True
        request = self.requests.get(request_id)
        # a fresh (or recomputed) prefill reduces when its whole prompt is in this step,
        # as the worker decides (plan.plan_prefill: prompt_split_across_steps)
        return request is not None and request.num_computed_tokens == 0 and num_tokens >= request.num_prompt_tokens

    def admitted(self, request_id: str, num_tokens: int, rows: int, block_size: int, first: bool) -> None:
        """A stage group allocated for the request (`first`: its first blocks)."""
        if rows < num_tokens and first:
            self.reducing.add(request_id)
            saved = cdiv(num_tokens, block_size) - cdiv(rows, block_size)
            self.blocks_not_allocated += saved
            if saved and self.on_not_allocated is not None:
                self.on_not_allocated(saved)

    def released(self, request_id: str) -> None:
        """Its blocks are gone (preempted or finished): a recompute decides again."""
        self.reducing.discard(request_id)

    def forget(self, request_id: str) -> None:
        self.reducing.discard(request_id)
        self.predicted.pop(request_id, None)


class StageAttentionManager(FullAttentionManager):
    """vLLM's full-attention manager for one stage's group, sized by `DropBook.rows`.
    Unbound (no scheduler of ours made it) it allocates for every token, as vLLM's."""

    book: DropBook | None = None

    def _rows(self, request_id: str, num_tokens: int) -> int:
        if self.book is None:
            return num_tokens
        return self.book.rows(request_id, num_tokens, self.kv_cache_spec.stage)

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, *args, **kwargs) -> int:
        return super().get_num_blocks_to_allocate(request_id, self._rows(request_id, num_tokens), *args, **kwargs)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int) -> list:
        rows = self._rows(request_id, num_tokens)
        if self.book is not None:
            first = not self.req_to_blocks.get(request_id)
            self.book.admitted(request_id, num_tokens, rows, self.block_size, first)
        return super().allocate_new_blocks(request_id, rows, num_tokens_main_model - (num_tokens - rows))


# The prompt's markers from the checkpoint's tokenizer (the model's token module), given
# in each process that serves the plugin's model (`serve_stages`).
_markers_of: Callable[[Any], PromptMarkers] | None = None


def serve_stages(markers_of: Callable[[Any], PromptMarkers]) -> None:
    """Make this process ready to size stages' KV: the spec registered, and how the
    scheduler reads a prompt."""
    global _markers_of
    _markers_of = markers_of
    register_stage_spec()


class DropPredictor:
    """A request's per-stage drops as the worker will plan them, from what the engine
    core holds (`plan.prefill_drops`, on a `RequestInfo` made from vLLM's `Request`)."""

    def __init__(self, config: ReductionConfig, pattern: str, markers: PromptMarkers) -> None:
        self.config = config  # the engine's (`--additional-config`)
        self.markers = markers
        self._schedule = Schedules(pattern)

    @classmethod
    def for_engine(cls, vllm_config: "VllmConfig") -> "DropPredictor | None":
        """The engine's predictor; None where no tokenizer tells the prompt's markers."""
        if _markers_of is None or vllm_config.model_config.skip_tokenizer_init:
            logger.warning(
                "stateful_reduce: no tokenizer in the scheduler; every request gets KV blocks for all its tokens"
            )
            return None
        from vllm.tokenizers import cached_tokenizer_from_config

        config = from_additional_config(vllm_config.additional_config)
        pattern = vllm_config.model_config.hf_config.text_config.hybrid_override_pattern
        return cls(config, pattern, _markers_of(cached_tokenizer_from_config(vllm_config.model_config)))

    def __call__(self, request: "Request") -> tuple[int, ...]:
        info = self.request_info(request)
        return () if info is None else prefill_drops(info, self.markers, self._schedule)

    def request_info(self, request: "Request") -> RequestInfo | None:
        """The request as the worker sees its whole-prompt prefill; None when its
        options are out of reach here (the shm cache keeps media data out)."""
        features = request.mm_features or ()
        if any(f.data is None for f in features):
            return None
        media = tuple(MediaSpan(f.modality, f.mm_position.offset, f.mm_position.length) for f in features)
        config = self.config.with_overrides(request_overrides(features))
        n = request.num_prompt_tokens
        return RequestInfo(request.request_id, n, config, 0, n, request.prompt_token_ids, media)


class StageScheduler(Scheduler):
    """vLLM's scheduler with a `DropBook` its stage managers read, filled when a request
    arrives, emptied when its blocks go."""

    kv_drops: DropBook

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from ..metrics import kv_blocks_counter

        self.kv_drops = DropBook(self.requests, on_not_allocated=kv_blocks_counter(self.vllm_config))
        managers = [
            m for m in self.kv_cache_manager.coordinator.single_type_managers if isinstance(m, StageAttentionManager)
        ]
        for manager in managers:
            manager.book = self.kv_drops
        self.predict_drops = DropPredictor.for_engine(self.vllm_config) if managers else None

    def add_request(self, request: "Request") -> None:
        if self.predict_drops is not None and request.request_id not in self.requests:  # not a session's next chunk
            drops = self.predict_drops(request)
            if any(drops):
                self.kv_drops.predicted[request.request_id] = drops
        super().add_request(request)

    def _free_request_blocks(self, request: "Request") -> None:  # preemption and finish
        super()._free_request_blocks(request)
        self.kv_drops.released(request.request_id)

    def _free_blocks(self, request: "Request") -> None:  # finish, abort
        super()._free_blocks(request)
        self.kv_drops.forget(request.request_id)


class StageAsyncScheduler(StageScheduler, AsyncScheduler):
    """The same, over vLLM's async scheduler (method order: ours, then AsyncScheduler's)."""


def stage_scheduler(*, vllm_config: "VllmConfig", **kwargs) -> Scheduler:
    """vLLM's scheduler (async where vLLM enabled it; it decides after the config hook
    runs) with the stages' drop book."""
    cls = StageAsyncScheduler if vllm_config.scheduler_config.async_scheduling else StageScheduler
    return cls(vllm_config=vllm_config, **kwargs)


# ------------------------------------------------------------------ configuration


def frees_dropped_kv(vllm_config: "VllmConfig") -> bool:
    """Whether stages hold KV blocks only for their rows (the scheduler and the model
    ask this one function, so both sides agree). Not under Model Runner V2: its model
    state is not handed the block counts the worker checks each step."""
    asked = from_additional_config(vllm_config.additional_config).free_dropped_kv
    if asked and vllm_config.use_v2_model_runner:
        logger.info(
            "stateful_reduce: Model Runner V2 gives every layer KV blocks for every token; VLLM_USE_V2_MODEL_RUNNER=0 "
            "(the V1 runner) frees the blocks of dropped tokens"
        )
        return False
    return asked


def install_stage_scheduler(vllm_config: "VllmConfig") -> None:
    """Set vLLM's scheduler to the plugin's (a user's own cannot be combined with it)."""
    sched = vllm_config.scheduler_config
    if sched.scheduler_cls not in (None, SCHEDULER):
        raise ValueError(
            f"--scheduler-cls {sched.scheduler_cls}: freeing dropped tokens' KV blocks needs the plugin's scheduler; "
            "drop --scheduler-cls, or set stateful_reduce.free_dropped_kv to false"
        )
    sched.scheduler_cls = SCHEDULER
