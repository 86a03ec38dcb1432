"""Per-stage attention and Mamba2 metadata for a batch whose token layout changed.

A stage's layout says, for every request of the batch (in batch order), how many
rows it has in this stage, how many keys its attention layers will hold after this
step, and each row's *logical* position in the request's compacted sequence.

Attention: the new metadata comes from the attention backend's own builder run on a
modified `CommonAttentionMetadata` (new query_start_loc / seq_lens / slot_mapping,
same block table), so derived fields (CPU scheduler metadata, GPU split info) are
right for any backend; kept tokens land at logical slots
`block_table[r, p // bs] * bs + p % bs`. Mamba2: the prefill token counts and the
chunk / conv metadata derived from them are recomputed with the builder's own
helpers; state indices and decode fields stay.
"""

import dataclasses
from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.mamba_attn import BaseMambaAttentionMetadataBuilder
from vllm.v1.attention.backends.utils import compute_causal_conv1d_metadata


@dataclass
class StageLayout:
    query_lens: list[int]  # rows per request in this stage
    seq_lens: list[int]  # keys per request in this stage's attention layers, after this step
    num_computed: list[int]  # keys before this step (logical), per request
    logical_pos: torch.Tensor  # (rows,) logical position of each row in its request
    row_request: torch.Tensor  # (rows,) request index of each row

    @property
    def query_start_loc(self) -> torch.Tensor:
        return torch.tensor([0, *torch.tensor(self.query_lens).cumsum(0).tolist()], dtype=torch.int32)


def standard_fields(meta) -> tuple[torch.Tensor, torch.Tensor]:
    """(seq_lens, block_table) of a backend's metadata; the common backends name them so."""
    try:
        return meta.seq_lens, meta.block_table
    except AttributeError as err:
        raise NotImplementedError(f"token reduction does not know attention metadata {type(meta).__name__}") from err


def logical_slots(block_table: torch.Tensor, row_request: torch.Tensor, logical_pos: torch.Tensor, block_size: int) -> torch.Tensor:
    blocks = block_table[row_request.long(), (logical_pos // block_size).long()]
    return (blocks.long() * block_size + logical_pos % block_size).to(torch.int64)


def attention_metadata(builder, meta, layout: StageLayout) -> tuple[object, torch.Tensor]:
    """(new metadata, new slot mapping) for one attention KV-cache group."""
    _, block_table = standard_fields(meta)
    device = block_table.device
    qsl = layout.query_start_loc
    slots = logical_slots(block_table, layout.row_request.to(device), layout.logical_pos.to(device), builder.kv_cache_spec.block_size)
    seq_lens_cpu = torch.tensor(layout.seq_lens, dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=qsl.to(device),
        query_start_loc_cpu=qsl,
        seq_lens=seq_lens_cpu.to(device),
        num_reqs=len(layout.query_lens),
        num_actual_tokens=int(qsl[-1]),
        max_query_len=max(layout.query_lens),
        max_seq_len=max(layout.seq_lens),
        block_table_tensor=block_table,
        slot_mapping=slots,
        causal=True,
        seq_lens_cpu_upper_bound=seq_lens_cpu,
    )
    return builder.build(0, common), slots


def mamba_metadata(meta, layout: StageLayout, chunk_size: int):
    """Mamba2 metadata with the prefill rows of `layout` (decode rows come first)."""
    if meta.num_prefills == 0:
        return meta
    num_decode_tokens = sum(layout.query_lens[: meta.num_decodes])
    qsl = layout.query_start_loc
    qsl_p = qsl[meta.num_decodes :] - num_decode_tokens
    computed_p = torch.tensor(layout.num_computed[meta.num_decodes :])
    cu_chunk, seq_idx, last_chunk, _ = BaseMambaAttentionMetadataBuilder._compute_chunk_metadata(
        chunk_size, meta.num_prefills, computed_p, qsl_p
    )
    device = meta.query_start_loc_p.device
    fields = dict(
        num_prefill_tokens=int(qsl_p[-1]),
        query_start_loc_p=qsl_p.to(device),
        cu_chunk_seqlen_p=torch.tensor(cu_chunk, dtype=torch.int32, device=device),
        seq_idx_p=torch.tensor(seq_idx, dtype=torch.int32, device=device),
        last_chunk_indices_p=torch.tensor(last_chunk, dtype=torch.int32, device=device),
    )
    if meta.nums_dict is not None:
        fields["nums_dict"], fields["batch_ptr"], fields["token_chunk_offset_ptr"] = compute_causal_conv1d_metadata(
            qsl_p, device=device
        )
    return dataclasses.replace(meta, **fields)
