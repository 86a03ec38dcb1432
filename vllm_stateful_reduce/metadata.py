"""Per-stage attention and Mamba2 metadata for a step whose token layout changes.

Built once per step for every stage that differs from the runner's layout, before
block 0, from the plan's host counts and its one device upload. Row r of request i
in stage j sits at logical position num_computed[j, i] + r of the request's
compacted sequence (0.. for a reduced prefill; `pos - dropped[j]` for later steps).

Attention: the new metadata comes from the attention backend's own builder run on a
modified `CommonAttentionMetadata` (new query_start_loc / seq_lens / slot_mapping,
same block table), so derived fields (CPU scheduler metadata, GPU split info) are
right for any backend; rows land at slots `block_table[i, p // bs] * bs + p % bs`.
Mamba2: the prefill token counts and the chunk / conv metadata derived from them are
recomputed with the builder's own helpers; state indices and decode fields stay.
"""

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.mamba_attn import BaseMambaAttentionMetadataBuilder
from vllm.v1.attention.backends.utils import compute_causal_conv1d_metadata

from .plan import DevicePlan, StepPlan

# per stage: layer name -> (metadata, slot mapping or None)
StageMetadata = dict[str, tuple[object, torch.Tensor | None]]


def standard_fields(meta) -> tuple[torch.Tensor, torch.Tensor]:
    """(seq_lens, block_table) of a backend's metadata; the common backends name them so."""
    try:
        return meta.seq_lens, meta.block_table
    except AttributeError as err:
        raise NotImplementedError(f"token reduction does not know attention metadata {type(meta).__name__}") from err


def logical_positions(plan: StepPlan, device_plan: DevicePlan, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows,) request index and logical position of every row of the stage, on the device."""
    rows = device_plan.query_start_loc[stage].diff().long()
    total = int(plan.rows[stage].sum())
    request = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), rows, output_size=total)
    first = device_plan.seq_lens[stage].long() - rows  # logical position of each request's first row
    offset = torch.arange(total, device=rows.device) - device_plan.query_start_loc[stage].long()[request]
    return request, first[request] + offset


def logical_slots(block_table: torch.Tensor, request: torch.Tensor, logical: torch.Tensor, block_size: int) -> torch.Tensor:
    blocks = block_table[request, logical // block_size]
    return (blocks.long() * block_size + logical % block_size).to(torch.int64)


def attention_metadata(builder, meta, plan: StepPlan, device_plan: DevicePlan, stage: int) -> tuple[object, torch.Tensor]:
    """(new metadata, new slot mapping) of one attention KV-cache group for a stage."""
    _, block_table = standard_fields(meta)
    request, logical = logical_positions(plan, device_plan, stage)
    slots = logical_slots(block_table, request, logical, builder.kv_cache_spec.block_size)
    query_lens, seq_lens = plan.rows[stage], plan.seq_lens[stage]
    common = CommonAttentionMetadata(
        query_start_loc=device_plan.query_start_loc[stage],
        query_start_loc_cpu=torch.from_numpy(plan.query_start_loc(stage).astype(np.int32)),
        seq_lens=device_plan.seq_lens[stage],
        num_reqs=len(query_lens),
        num_actual_tokens=int(query_lens.sum()),
        max_query_len=int(query_lens.max()),
        max_seq_len=int(seq_lens.max()),
        block_table_tensor=block_table,
        slot_mapping=slots,
        causal=True,
        seq_lens_cpu_upper_bound=torch.from_numpy(seq_lens.astype(np.int32)),
    )
    return builder.build(0, common), slots


def mamba_metadata(meta, plan: StepPlan, device_plan: DevicePlan, stage: int):
    """Mamba2 metadata with the stage's prefill rows (decode rows come first; unchanged)."""
    if meta.num_prefills == 0:
        return meta
    from vllm.utils.torch_utils import async_tensor_h2d

    decodes = meta.num_decodes
    qsl = plan.query_start_loc(stage)
    qsl_p = qsl[decodes:] - qsl[decodes]
    # host arrays: vLLM's helper reads them row by row
    cu_chunk, seq_idx, last_chunk, _ = BaseMambaAttentionMetadataBuilder._compute_chunk_metadata(
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
    attention_names: list[str],
    mamba_names: list[str],
    builder_for: Callable[[str, object], object],
) -> list[StageMetadata | None]:
    """Every stage's metadata (None where the runner's own stands), one build per
    KV-cache group and stage."""
    out: list[StageMetadata | None] = []
    for stage in range(plan.num_stages):
        if not plan.changes(stage):
            out.append(None)
            continue
        built: dict[int, tuple[object, torch.Tensor | None]] = {}
        stage_md: StageMetadata = {}
        for name in attention_names:
            meta = current[name]
            if id(meta) not in built:
                built[id(meta)] = attention_metadata(builder_for(name, meta), meta, plan, device_plan, stage)
            stage_md[name] = built[id(meta)]
        for name in mamba_names:
            meta = current[name]
            if id(meta) not in built:
                built[id(meta)] = (mamba_metadata(meta, plan, device_plan, stage), None)
            stage_md[name] = built[id(meta)]
        out.append(stage_md)
    return out
