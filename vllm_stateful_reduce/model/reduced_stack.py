"""NemotronH language model whose prefill drops visual tokens between blocks.

vLLM's own layer classes run (with the two scoring block kinds injected through
`decoder_layer_types`); this module owns only the loop over them. Per step:

1. plan on the host (`plan.plan_step`): which requests reduce, every stage's counts;
   upload what the device needs in one copy;
2. build the attention / Mamba2 metadata of every stage that changes (`adapter.stage_metadata`);
3. run the blocks; a scoring block adds its scores for all reducing requests in one
   call (`scoring`); at a boundary one batched top-k picks the winners, hidden
   states and residuals are gathered (`selection`) and the next stage's metadata
   goes into the forward context;
4. scatter the rows back to the full layout, which the sampler indexes (rows of
   dropped tokens are zeros), and record what decode steps need (`state`).
"""

from functools import partial

import numpy as np
import torch
from vllm.compilation.decorators import ignore_torch_compile
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.models.nemotron_h import (
    NemotronHAttentionDecoderLayer,
    NemotronHForCausalLM,
    NemotronHMambaDecoderLayer,
    NemotronHModel,
)

from .. import scoring
from ..adapter import stage_metadata as md
from ..adapter.kv_stages import declare_stage, frees_dropped_kv
from ..adapter.mixer_taps import nemotron_h_stack
from ..adapter.stage_metadata import attention_backend_problem, install_layer_metadata, stage_builders
from ..config import from_additional_config
from ..log import ReasonRateLimit, local_first_rank
from ..metrics import ReductionMetrics
from ..plan import DevicePlan, PromptMarkers, StepPlan, plan_step
from ..schedule import SCORING_KINDS, Schedules, boundary_blocks, stage_of
from ..selection import Kept, compact, top_k
from ..state import ReductionState, RunnerBatch
from ..timing import PhaseTimer
from .layers import SCORED_LAYER_TYPES

logger = init_logger(__name__)


@ignore_torch_compile
class ReducibleNemotronHModel(NemotronHModel):
    """Eager NemotronH stack with reduction boundaries (see module docstring)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", prompt_markers: PromptMarkers) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, decoder_layer_types=SCORED_LAYER_TYPES)
        self.vllm_config = vllm_config
        self.prompt_markers = prompt_markers
        self.pattern = self.config.hybrid_override_pattern
        global_config = from_additional_config(vllm_config.additional_config)  # checked at start-up
        self.boundaries = boundary_blocks(self.pattern, global_config)  # engine-wide
        # timing, record_kept, and scoring and selection choices: engine-wide, never per
        # request (config.PER_REQUEST_FIELDS)
        self.engine_config = global_config
        self.state = ReductionState()
        self.metrics = ReductionMetrics.for_engine(vllm_config, len(self.boundaries) + 1)
        self._log_limit = ReasonRateLimit()
        self.batch = RunnerBatch()  # set by the runner glue before each forward
        self.attention_groups: tuple[md.StageBuilders, ...] | None = None  # bound by the runner glue
        self._schedule = Schedules(self.pattern)
        self.stage_layers = self._layers_by_stage()
        if frees_dropped_kv(vllm_config):
            self._declare_kv_stages()
        for layer in self.layers:
            if isinstance(layer, NemotronHMambaDecoderLayer) and layer.mixer.n_groups % layer.mixer.tp_size:
                raise ValueError("token reduction needs n_groups divisible by the tensor-parallel size")

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if not self.batch.requests:  # dummy / profile runs
            return NemotronHModel.forward(self, input_ids, positions, intermediate_tensors, inputs_embeds)
        timer = PhaseTimer(self.engine_config.timing, positions.device)
        start = timer.clock()
        with timer.phase("plan"):
            plan = plan_step(
                self.batch.requests, self.state.dropped, self.prompt_markers, self._schedule, len(self.boundaries) + 1
            )
            self._record_plan(plan)
            self._check_kv_bounds(plan)
        if not plan.active:
            out = NemotronHModel.forward(self, input_ids, positions, intermediate_tensors, inputs_embeds)
        else:
            with md.forward_context_kept():
                out = self._reduced_forward(plan, timer, input_ids, positions, inputs_embeds)
        self.metrics.record_work(timer.seconds)
        if self.engine_config.timing:
            self.state.timings.append(
                timer.record(start, bool(plan.reducing), len(plan.scheduled), int(plan.scheduled.sum()))
            )
        return out

    def _record_plan(self, plan: StepPlan) -> None:
        self.state.forget_all_but(self.batch.live)
        for req_id, dropped in plan.dropped.items():
            self.state.record(req_id, dropped)
        self.metrics.record_plan(plan)
        for skip in plan.skipped:
            self.state.skipped[skip.kind] += 1
            self._log_rate_limited(skip.kind, "request %s served unreduced: %s", skip.req_id, skip.reason)
        for request in plan.reducing:
            self.state.queries[request.query] += 1
            if request.query == "template_tail":
                self._log_rate_limited(
                    request.query,
                    "request %s reduced with its question before the media: its visual tokens are scored by the "
                    "%d rows of the chat template after them (reduce_question_before_media)",
                    request.req_id,
                    request.num_query,
                )

    def _check_kv_bounds(self, plan: StepPlan) -> None:
        if self.batch.blocks_held and self.attention_groups is not None:
            problem = md.kv_bound_problem(plan, self.attention_groups, self.stage_layers, self.batch.blocks_held)
            if problem is not None:
                raise RuntimeError(f"stateful_reduce: {problem}")

    def _log_rate_limited(self, key: str, message: str, *args: object) -> None:
        """One line per `key` at most every minute (log.ReasonRateLimit), on the local first rank."""
        held = self._log_limit.passes(key) if local_first_rank() else None
        if held is not None:
            more = f" ({held} more like it since the last line)" if held else ""
            logger.info(message + "%s", *args, more)

    def _reduced_forward(self, plan: StepPlan, timer: PhaseTimer, input_ids, positions, inputs_embeds) -> torch.Tensor:
        """A step whose row layout differs from the runner's in some stage (`plan.active`)."""
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        num_tokens, total = hidden.shape[0], int(plan.scheduled.sum())
        hidden, residual = hidden[:total], None
        # 1. every changing stage's attention / Mamba2 metadata, from one upload of the plan
        with timer.phase("metadata"):
            device_plan = plan.upload(hidden.device)
            stages = self._stage_metadata(plan, device_plan)
        # 2. the reducing requests' visual tokens, unscored (none when the step only
        #    continues earlier reduced requests: a new layout, nothing to select)
        kept = Kept(
            device_plan.visual_rows,
            device_plan.visual_positions,
            torch.zeros_like(device_plan.visual_rows, dtype=torch.float32),
        )
        history = [kept.positions]  # per stage, for `record_kept`
        rows = torch.arange(total, device=hidden.device)  # each row's row in the runner's layout
        scored = self._scored_stages(plan)
        self._install(stages[0])
        stage = 0
        for b, layer in enumerate(self.layers):
            # 3. the block; one that scores adds its scores of the kept visual tokens
            if stage in scored and self._scores_block(b):
                hidden, residual, projection = layer.forward_scored(positions, hidden, residual)
                with timer.phase("scoring"):
                    kept = kept.with_scores(self._block_scores(layer, projection, device_plan, stage, kept))
            else:
                hidden, residual = layer(positions=positions, hidden_states=hidden, residual=residual)
            if stage == len(self.boundaries) or b != self.boundaries[stage]:
                continue
            # 4. a boundary: where a request keeps fewer tokens, select and compact the rows
            stage += 1
            if self._drops_at(plan, stage):
                with timer.phase("selection"):
                    ranking = (
                        self._ranking(plan, kept, stage) if self.engine_config.selection == "random" else kept.scores
                    )
                    index, kept = self._select(plan, device_plan, kept, stage, ranking)
                with timer.phase("compaction"):
                    hidden, residual = self._gather(hidden, index), self._gather(residual, index)
                    rows = rows[index]
            elif self._stage_scores(stage):
                kept = kept.restarted()  # the next stage selects with its own scores
            history.append(kept.positions)
            self._install(stages[stage])
        hidden, _ = self.norm_f(hidden, residual)
        if self.engine_config.record_kept and plan.reducing:
            self._record_kept(plan, history)
        # 5. back to the runner's layout, which the sampler indexes (dropped rows: zeros)
        if hidden.shape[0] == num_tokens:
            return hidden
        out = hidden.new_zeros(num_tokens, hidden.shape[1])
        return out.index_copy_(0, rows, hidden)

    def _stage_metadata(self, plan: StepPlan, device_plan: DevicePlan) -> list[md.StageMetadata | None]:
        if self.attention_groups is None:
            raise RuntimeError("the runner glue did not bind the attention groups (adapter.runner_glue)")
        return md.stage_metadata(
            plan, device_plan, md.current_metadata(), self.attention_groups, self.batch.block_tables, self.stage_layers
        )

    # ------------------------------------------------------------------ pieces

    def _layers_by_stage(self) -> tuple[md.StageLayers, ...]:
        """Per stage, the names its attention and Mamba2 layers read metadata under."""
        attention: list[set[str]] = [set() for _ in range(len(self.boundaries) + 1)]
        mamba: list[list[str]] = [[] for _ in range(len(self.boundaries) + 1)]
        for block, layer in enumerate(self.layers):
            stage = stage_of(block, self.boundaries)
            if isinstance(layer, NemotronHAttentionDecoderLayer):
                attention[stage].add(layer.mixer.attn.layer_name)
            elif isinstance(layer, NemotronHMambaDecoderLayer):
                mamba[stage].append(layer.mixer.prefix)
        return tuple(md.StageLayers(frozenset(a), tuple(m)) for a, m in zip(attention, mamba, strict=True))

    def _declare_kv_stages(self) -> None:
        """Each attention layer declares its stage's KV-cache spec: vLLM then sizes every
        stage's blocks on its own (adapter/kv_stages.py)."""
        for block, layer in enumerate(self.layers):
            if isinstance(layer, NemotronHAttentionDecoderLayer):
                declare_stage(layer.mixer.attn, stage_of(block, self.boundaries))

    def _scores_block(self, block: int) -> bool:
        kind = SCORING_KINDS.get(self.pattern[block])
        return (
            self.engine_config.selection == "scores"
            and kind is not None
            and self.engine_config.score_layers in ("all", kind)
        )

    def _stage_scores(self, stage: int) -> bool:
        """Whether any block of stage `stage` contributes scores."""
        edges = [-1, *self.boundaries, len(self.pattern) - 1]
        return any(self._scores_block(b) for b in range(edges[stage] + 1, edges[stage + 1] + 1))

    @staticmethod
    def _drops_at(plan: StepPlan, stage: int) -> bool:
        """Whether any reducing request keeps fewer visual tokens in `stage` than before."""
        return any(r.keep[stage] < r.keep[stage - 1] for r in plan.reducing)

    def _scored_stages(self, plan: StepPlan) -> set[int]:
        """Stages whose scores some selection uses: a stage that ends with a drop, and a
        stage whose scores a following stage without scoring blocks carries to its own
        drop."""
        needed, carried = set(), False
        for stage in reversed(range(len(self.boundaries))):
            if self._drops_at(plan, stage + 1) or carried:
                needed.add(stage)
            carried = stage in needed and not self._stage_scores(stage)
        return needed

    def _block_scores(self, layer, read, device_plan: DevicePlan, stage: int, kept: Kept) -> torch.Tensor:
        args = (device_plan.query_rows[stage], device_plan.queries, device_plan.keys[stage], kept.rows)
        config = self.engine_config
        if isinstance(layer, NemotronHAttentionDecoderLayer):
            scores = scoring.attention_block_scores(read, layer.mixer, *args)
        else:
            scores = scoring.mamba_block_scores(read, layer.mixer, *args, config.mamba_dt, config.mamba_decay)
        return scoring.normalised(scores, kept.valid, config.score_norm)

    def _select(self, plan: StepPlan, device_plan: DevicePlan, kept: Kept, stage: int, ranking: torch.Tensor):
        """Keep each reducing request's `keep[stage]` best-ranked visual tokens."""
        k_max = max(r.keep[stage] for r in plan.reducing)
        chosen = top_k(ranking, kept.valid, device_plan.keep[stage], k_max)
        carry = stage > 0 and not self._stage_scores(stage)
        return compact(kept, chosen, int(plan.rows[stage - 1].sum()), int(plan.rows[stage].sum()), carry)

    @staticmethod
    def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return scoring.kernels_for(x).gather_rows(x, index)

    def _ranking(self, plan: StepPlan, kept: Kept, stage: int) -> torch.Tensor:
        """`selection: random` (a baseline): a seeded random order per request, made on the host."""
        ranking = np.zeros(tuple(kept.rows.shape), dtype=np.float32)
        for i, r in enumerate(plan.reducing):
            count = r.keep[stage - 1]
            generator = torch.Generator().manual_seed(1_000_003 * stage + count)
            ranking[i, torch.randperm(count, generator=generator).numpy()] = np.arange(count, 0, -1)
        return torch.from_numpy(ranking).to(kept.rows.device)

    def _install(self, stage_md: md.StageMetadata | None) -> None:
        """Put a stage's metadata in the forward context for every layer. (None: the
        runner's layout stands; only stages before the first change can be None, since
        rows and keys per request never grow with depth.)"""
        if stage_md is not None:
            install_layer_metadata(stage_md)

    def _record_kept(self, plan: StepPlan, history: list[torch.Tensor]) -> None:
        """Prompt positions of the visual tokens kept at each stage (one device read)."""
        widths = [h.shape[1] for h in history]
        kept = torch.cat(history, dim=1).cpu().numpy()
        for i, r in enumerate(plan.reducing):
            per_stage = np.split(kept[i], np.cumsum(widths)[:-1])
            self.state.record_kept(r.req_id, [s[s >= 0].tolist() for s in per_stage])

    # ------------------------------------------------------------------ binding

    def bind_attention_groups(self, groups: list) -> None:
        """Take the runner's attention groups of this stack's layers and make every
        stage's metadata builders now, while the runner makes its own (before the KV
        cache tensors are allocated); refuse a backend whose metadata is not rebuilt."""
        mine = set().union(*(stage.attention for stage in self.stage_layers))
        ours = [g for g in groups if mine & set(g.layer_names)]
        problem = attention_backend_problem(ours)
        if problem is not None:
            raise ValueError(problem)
        missing = mine - {name for g in ours for name in g.layer_names}
        if missing:
            raise ValueError(f"no attention group of the runner holds layers {sorted(missing)}")
        reduced_stages = len(self.boundaries)  # stage 0 keeps the runner's layout: no builder
        self.attention_groups = tuple(
            md.StageBuilders(g, (None, *stage_builders(g, self.vllm_config, reduced_stages))) for g in ours
        )


class ReducibleNemotronHForCausalLM(NemotronHForCausalLM):
    """vLLM's NemotronHForCausalLM built around `ReducibleNemotronHModel`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", prompt_markers: PromptMarkers) -> None:
        with nemotron_h_stack(partial(ReducibleNemotronHModel, prompt_markers=prompt_markers)):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
