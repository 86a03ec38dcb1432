"""NemotronH language model whose prefill drops visual tokens between blocks.

vLLM's own layer classes run unchanged; this module owns only the loop over them.
Per step: plan which requests reduce (fresh, whole-prompt prefills with video and
query text) and which carry drops from their prefill (later steps). Then, block by
block: run the block, add its scores (captured q/k or in_proj output) for each
reducing request, and at a stage boundary keep the top-k visual rows per request,
gather hidden states and residuals, and install the next stage's attention / Mamba2
metadata in the forward context. At the end the rows go back to the full layout,
which the sampler indexes (rows of dropped tokens are zeros).
"""

from dataclasses import dataclass, field
from unittest import mock

import torch
from vllm.compilation.decorators import ignore_torch_compile
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.model_executor.models import nemotron_h
from vllm.multimodal.video_prune.evs import compute_retained_tokens_count, compute_retention_mask
from vllm.model_executor.models.nemotron_h import (
    NemotronHAttentionDecoderLayer,
    NemotronHForCausalLM,
    NemotronHMambaDecoderLayer,
    NemotronHModel,
)

from .. import metadata as md
from .. import scoring
from ..config import ReductionConfig
from ..schedule import SCORING_KINDS, Schedule, boundary_blocks, build_schedule
from ..state import ReductionState, RequestInfo

logger = init_logger(__name__)


@dataclass
class Request:
    """One request of the batch during one step."""

    index: int
    info: RequestInfo
    rows: int  # rows in the current stage
    num_computed: int  # logical keys before this step, stage 0
    seq_len: int  # keys after this step, stage 0
    positions: torch.Tensor  # original positions of its current rows
    start: int = 0  # first row in the batch's input layout
    # reducing requests only (local row indices in the current stage):
    visual: torch.Tensor | None = None
    query: torch.Tensor | None = None
    keep: list[int] | None = None  # visual tokens per stage
    scores: torch.Tensor | None = None
    dropped: list[int] = field(default_factory=list)  # per stage, from an earlier prefill
    kept_positions: list[list[int]] = field(default_factory=list)  # per stage, reducing requests


@ignore_torch_compile
class ReducibleNemotronHModel(NemotronHModel):
    """Eager NemotronH stack with reduction boundaries (see module docstring)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vllm_config = vllm_config
        self.pattern = self.config.hybrid_override_pattern
        self.state = ReductionState()
        self.batch_requests: list[RequestInfo] = []
        self.image_context_id: int | None = None  # set by the VLM
        self.video_end_length = 1  # tokens of `</img>`; set by the VLM
        self.tokens_per_frame = 1  # visual tokens per frame; set by the VLM
        self._builders: dict[type, object] = {}
        self._schedules: dict[str, Schedule] = {}  # by config; a schedule is a bisection
        self.attention_names = [
            l.mixer.attn.layer_name for l in self.layers if isinstance(l, NemotronHAttentionDecoderLayer)
        ]
        self.mamba_names = [l.mixer.prefix for l in self.layers if isinstance(l, NemotronHMambaDecoderLayer)]
        self._captured: dict[int, torch.Tensor] = {}
        self._capturing = False
        for i, layer in enumerate(self.layers):
            if isinstance(layer, NemotronHMambaDecoderLayer):
                mixer = layer.mixer
                if mixer.n_groups % mixer.tp_size:
                    raise ValueError("token reduction needs n_groups divisible by the tensor-parallel size")
                mixer.in_proj.register_forward_hook(self._capture_hook(i))
            elif isinstance(layer, NemotronHAttentionDecoderLayer):
                layer.mixer.qkv_proj.register_forward_hook(self._capture_hook(i))

    def _capture_hook(self, block: int):
        def hook(_module, _inputs, output):
            if self._capturing:
                self._captured[block] = output[0] if isinstance(output, tuple) else output

        return hook

    # ------------------------------------------------------------------ planning

    def _plan(self, input_ids: torch.Tensor | None) -> list[Request] | None:
        ctx = get_forward_context()
        attn_md = ctx.attn_metadata
        infos = self.batch_requests
        if not isinstance(attn_md, dict) or not infos or input_ids is None:
            return None
        attn_meta = attn_md.get(self.attention_names[0]) if self.attention_names else None
        if attn_meta is None:
            return None
        seq_lens, _ = md.standard_fields(attn_meta)
        qsl = attn_meta.query_start_loc.cpu().tolist()
        seq_lens = seq_lens.cpu().tolist()
        if len(qsl) - 1 != len(infos):
            logger.warning_once("batch has %d rows but %d request infos; not reducing", len(qsl) - 1, len(infos))
            return None
        self.state.forget_all_but(i.req_id for i in infos)
        requests, active = [], False
        for r, info in enumerate(infos):
            start, rows = qsl[r], qsl[r + 1] - qsl[r]
            computed = seq_lens[r] - rows
            req = Request(r, info, rows, computed, seq_lens[r], torch.arange(computed, seq_lens[r]), start)
            if computed == 0:
                self._plan_prefill(req, input_ids[start : start + rows])
            else:
                req.dropped = self.state.dropped.get(info.req_id, [])
            active |= req.keep is not None or any(req.dropped)
            requests.append(req)
        return requests if active else None

    def _plan_prefill(self, req: Request, ids: torch.Tensor) -> None:
        config: ReductionConfig = req.info.config
        # visual rows of the prompt (a recomputed request also carries its output)
        visual = torch.nonzero(ids[: req.info.num_prompt_tokens] == self.image_context_id).flatten().cpu()
        reason = None
        if req.rows < req.info.num_prompt_tokens:
            reason = "prompt_split_across_steps"
        elif not len(visual):
            reason = "no_video"
        elif not config.enabled:
            reason = "disabled"
        # the question: prompt text after the last video's closing wrapper (`</img>`)
        first_query = int(visual[-1]) + 1 + self.video_end_length if reason is None else 0
        query = torch.arange(first_query, req.info.num_prompt_tokens) if reason is None else None
        if reason is None and not len(query):
            reason = "no_text_after_video"
        keep = None
        if reason is None and config.evs_rate and len(visual) % self.tokens_per_frame:
            reason = "visual_tokens_not_whole_frames"
        if reason is None:
            entering = len(visual)  # visual tokens that enter the LLM after EVS
            if config.evs_rate:
                frames = len(visual) // self.tokens_per_frame
                entering = compute_retained_tokens_count(self.tokens_per_frame, frames, config.evs_rate)
            try:
                keep = self._schedule(config).keep_counts(entering, config.min_keep)
            except ValueError as err:  # a per-request budget this pattern cannot reach
                reason = f"infeasible: {err}"
            if keep is not None and keep[-1] == len(visual):
                reason, keep = "nothing_to_drop", None
        self.state.record(req.info.req_id, [len(visual) - k for k in keep] if keep else [])
        if reason is not None:
            if reason not in ("no_video", "disabled"):
                self.state.count_skip(reason.split(":")[0])
                logger.info("request %s served unreduced: %s", req.info.req_id, reason)
            return
        req.visual, req.query, req.keep = visual, query, keep
        req.kept_positions = [visual.tolist()]
        req.scores = torch.zeros(len(visual), dtype=torch.float32)

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        requests = self._plan(input_ids)
        if requests is None:
            return NemotronHModel.forward(self, input_ids, positions, intermediate_tensors, inputs_embeds)
        ctx = get_forward_context()
        saved = dict(ctx.attn_metadata), dict(ctx.slot_mapping)
        try:
            return self._reduced_forward(requests, input_ids, positions, inputs_embeds)
        finally:
            ctx.attn_metadata.clear()
            ctx.attn_metadata.update(saved[0])
            ctx.slot_mapping.clear()
            ctx.slot_mapping.update(saved[1])

    def _reduced_forward(self, requests: list[Request], input_ids, positions, inputs_embeds) -> torch.Tensor:
        num_tokens = (inputs_embeds if inputs_embeds is not None else input_ids).shape[0]
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        total = sum(r.rows for r in requests)
        hidden, residual = hidden[:total], None
        orig_rows = torch.arange(total)
        reducing = [r for r in requests if r.keep is not None]
        config = requests[0].info.config  # boundaries and scoring choices are engine-wide
        boundaries = boundary_blocks(self.pattern, config)
        evs = [r for r in reducing if r.info.config.evs_rate]
        if evs:  # EVS-style pruning of the input embeddings, before block 0
            index = self._select(requests, 0, lambda req, _stage: self._evs_choice(req, hidden))
            if index is not None:
                hidden = scoring.kernels_for(hidden).gather_rows(hidden, index)
                orig_rows = orig_rows[index.cpu()]
        if evs or any(r.dropped and r.dropped[0] for r in requests):
            self._install_stage(requests, 0)
        stage = 0
        for b, layer in enumerate(self.layers):
            scoring_block = bool(reducing) and stage < len(boundaries) and self._scores_block(b, config)
            self._capturing = scoring_block
            hidden, residual = layer(positions=positions, hidden_states=hidden, residual=residual)
            self._capturing = False
            if scoring_block:
                self._add_scores(b, layer, requests, config)
            if stage < len(boundaries) and b == boundaries[stage]:
                stage += 1
                index = self._select(requests, stage, self._score_choice)
                if index is not None:
                    gather = scoring.kernels_for(hidden).gather_rows
                    hidden, residual = gather(hidden, index), gather(residual, index)
                    orig_rows = orig_rows[index.cpu()]
                self._install_stage(requests, stage)
        hidden, _ = self.norm_f(hidden, residual)
        if hidden.shape[0] == num_tokens and len(orig_rows) == num_tokens:
            return hidden
        out = hidden.new_zeros(num_tokens, hidden.shape[1])
        out[orig_rows.to(hidden.device)] = hidden
        return out

    def _schedule(self, config: ReductionConfig) -> Schedule:
        key = config.model_dump_json()
        if key not in self._schedules:
            self._schedules[key] = build_schedule(self.pattern, config)
        return self._schedules[key]

    def _stage_scores(self, stage: int) -> bool:
        """Whether any block of stage `stage` contributes scores."""
        config = self.batch_requests[0].config  # boundaries are engine-wide
        edges = [-1, *boundary_blocks(self.pattern, config), len(self.pattern) - 1]
        return any(self._scores_block(b, config) for b in range(edges[stage] + 1, edges[stage + 1] + 1))

    def _scores_block(self, block: int, config: ReductionConfig) -> bool:
        kind = SCORING_KINDS.get(self.pattern[block])
        return config.selection == "scores" and kind is not None and config.score_layers in ("all", kind)

    def _add_scores(self, block: int, layer, requests: list[Request], config: ReductionConfig) -> None:
        out = self._captured.pop(block)
        start = 0
        for req in requests:
            rows = out[start : start + req.rows]
            start += req.rows
            if req.keep is None:
                continue
            if isinstance(layer, NemotronHAttentionDecoderLayer):
                m = layer.mixer
                s = scoring.attention_block_scores(rows, req.query, req.visual, m.num_heads, m.num_kv_heads, m.head_dim)
            else:
                s = scoring.mamba_block_scores(rows, layer.mixer, req.query, req.visual, config.mamba_dt, config.mamba_decay)
            req.scores += scoring.normalised(s.float().cpu(), config.score_norm)

    def _score_choice(self, req: Request, stage: int) -> torch.Tensor:
        """Indices (into req.visual) of the top-k by score, or a seeded random k."""
        k = req.keep[stage]
        if req.info.config.selection == "random":  # baseline: seeded, same count
            generator = torch.Generator().manual_seed(1_000_003 * stage + len(req.scores))
            return torch.randperm(len(req.scores), generator=generator)[:k]
        return torch.sort(req.scores, descending=True, stable=True).indices[:k]

    def _evs_choice(self, req: Request, hidden: torch.Tensor) -> torch.Tensor:
        """vLLM's EVS rule on the request's visual input embeddings (frames in order)."""
        if not req.info.config.evs_rate:
            return torch.arange(len(req.visual))
        rows = hidden[req.start + req.visual.to(hidden.device)]
        side = int(round(self.tokens_per_frame**0.5))
        mask = compute_retention_mask(rows, (len(rows) // self.tokens_per_frame, side, side), 1, req.info.config.evs_rate)
        return torch.nonzero(mask.cpu()).flatten()

    def _select(self, requests: list[Request], stage: int, choose) -> torch.Tensor | None:
        """Keep `choose(req, stage)` of each reducing request's visual rows (order kept),
        text rows always; returns the gather index (None if nothing changed)."""
        pieces, start, changed = [], 0, False
        for req in requests:
            rows_before = req.rows
            local = torch.arange(req.rows)
            if req.keep is not None:
                k = req.keep[stage]
                kept_visual = torch.sort(choose(req, stage)).values
                stay = torch.ones(req.rows, dtype=torch.bool)
                stay[req.visual] = False
                stay[req.visual[kept_visual]] = True
                local = torch.nonzero(stay).flatten()
                changed |= len(local) != req.rows
                # re-express visual/query rows in the new local coordinates
                new_index = torch.full((req.rows,), -1, dtype=torch.long)
                new_index[local] = torch.arange(len(local))
                req.visual = new_index[req.visual[kept_visual]]
                req.query = new_index[req.query]
                # a stage without scoring blocks selects with the scores it inherited
                req.scores = torch.zeros(k) if self._stage_scores(stage) else req.scores[kept_visual]
                req.positions = req.positions[local]
                req.rows = len(local)
                if stage == 0:  # EVS: the tokens entering the LLM
                    req.kept_positions = []
                req.kept_positions.append(req.positions[req.visual].tolist())
                if stage + 1 >= len(req.keep):
                    req.keep = None  # last boundary done
                    self.state.record_kept(req.info.req_id, req.kept_positions)
            pieces.append(local + start)
            start += rows_before
        return torch.cat(pieces) if changed else None

    def _install_stage(self, requests: list[Request], stage: int) -> None:
        """Put stage `stage`'s metadata in the forward context for every layer."""
        layout = self._layout(requests, stage)
        ctx = get_forward_context()
        rebuilt: dict[int, tuple[object, torch.Tensor | None]] = {}
        for name in self.attention_names:
            meta = ctx.attn_metadata[name]
            if id(meta) not in rebuilt:
                rebuilt[id(meta)] = md.attention_metadata(self._builder(name, meta), meta, layout)
            ctx.attn_metadata[name], ctx.slot_mapping[name] = rebuilt[id(meta)]
        for name in self.mamba_names:
            meta = ctx.attn_metadata[name]
            if id(meta) not in rebuilt:
                rebuilt[id(meta)] = (md.mamba_metadata(meta, layout, meta.chunk_size), None)
            ctx.attn_metadata[name] = rebuilt[id(meta)][0]

    def _layout(self, requests: list[Request], stage: int) -> md.StageLayout:
        query_lens, seq_lens, computed, logical, owner = [], [], [], [], []
        for req in requests:
            dropped = req.dropped[stage] if stage < len(req.dropped) else 0
            if req.rows != len(req.positions):
                raise AssertionError("row bookkeeping out of step")
            fresh_reduced = req.num_computed == 0 and req.rows != req.seq_len
            if fresh_reduced:  # compacted prefill: logical positions 0..rows-1
                logical.append(torch.arange(req.rows))
                seq_lens.append(req.rows)
            else:
                logical.append(req.positions - dropped)
                seq_lens.append(req.seq_len - dropped)
            computed.append(req.num_computed - dropped if not fresh_reduced else 0)
            query_lens.append(req.rows)
            owner.append(torch.full((req.rows,), req.index))
        return md.StageLayout(query_lens, seq_lens, computed, torch.cat(logical), torch.cat(owner))

    def _builder(self, layer_name: str, meta) -> object:
        """The attention backend's metadata builder for this layer's KV-cache group."""
        if type(meta) not in self._builders:
            layer = self.vllm_config.compilation_config.static_forward_context[layer_name]
            spec = layer.get_kv_cache_spec(self.vllm_config)
            names = self.attention_names
            device = md.standard_fields(meta)[1].device
            self._builders[type(meta)] = layer.get_attn_backend().get_builder_cls()(spec, names, self.vllm_config, device)
        return self._builders[type(meta)]


class ReducibleNemotronHForCausalLM(NemotronHForCausalLM):
    """vLLM's NemotronHForCausalLM built around `ReducibleNemotronHModel`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        # NemotronHForCausalLM.__init__ names the stack class through its module;
        # swap it for the duration of construction (vLLM 0.32 layout).
        with mock.patch.object(nemotron_h, "NemotronHModel", ReducibleNemotronHModel):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
