"""Language-aware importance of visual tokens, from the block that just ran.

Attention block: mean softmax attention of the query rows (text after the last
visual token) over the request's keys, read at the visual columns. Mamba2 block:
the implicit-attention proxy |C_t . B_s| (x dt_s), without the exp(A * sum dt)
decay unless asked, with B and C recomputed from the block's in_proj output through
its causal conv1d + SiLU exactly as the scan consumes them (only at the rows that
are scored). Each block's scores over a request's visual tokens are put on one scale (z-scores by
default) so attention and Mamba blocks add up.

All reducing requests of a step are scored in one call per block (varlen, sizes from
the plan), on the hidden states' device. With tensor parallelism each rank holds a
slice of the heads / groups, so partial sums are all-reduced before anyone picks.
"""

from types import ModuleType

import torch
import torch.nn.functional as F

from .kernels import torch_ops
from .kernels.torch_ops import Varlen

triton_kernels: ModuleType | None
try:  # Triton is optional: the CPU build runs torch_ops
    from .kernels import triton_kernels
except Exception:  # depends on the install
    triton_kernels = None


def kernels_for(x: torch.Tensor):
    return triton_kernels if (x.is_cuda and triton_kernels is not None) else torch_ops


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(x) if get_tensor_model_parallel_world_size() > 1 else x


def normalised(scores: torch.Tensor, valid: torch.Tensor, how: str) -> torch.Tensor:
    """Each row's scores over its valid (visual) entries on the common scale (`score_norm`):
    divided by their sum, or z-scored (unbiased std; a row with < 2 tokens gets zeros)."""
    scores = scores.masked_fill(~valid, 0.0)
    if how == "sum":
        return scores / scores.sum(1, keepdim=True).clamp_min(1e-30)
    n = valid.sum(1, keepdim=True)
    mean = scores.sum(1, keepdim=True) / n.clamp_min(1)
    var = ((scores - mean) ** 2).masked_fill(~valid, 0.0).sum(1, keepdim=True) / (n - 1).clamp_min(1)
    z = (scores - mean) / var.sqrt().clamp_min(1e-30)
    return z.masked_fill(~valid | (n < 2), 0.0)


def attention_block_scores(
    qkv: torch.Tensor, mixer, query_rows: torch.Tensor, queries: Varlen, keys: Varlen, visual_rows: torch.Tensor
) -> torch.Tensor:
    """(R, V) scores of the visual rows from the question rows; `qkv` is the block's
    qkv projection of the stage's packed batch."""
    q_size, kv_size = mixer.num_heads * mixer.head_dim, mixer.num_kv_heads * mixer.head_dim
    q = qkv.index_select(0, query_rows)[:, :q_size].view(-1, mixer.num_heads, mixer.head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(-1, mixer.num_kv_heads, mixer.head_dim)
    scores = kernels_for(qkv).attention_scores(q, k, queries, keys, visual_rows, mixer.head_dim**-0.5)
    return tp_all_reduce(scores)


def mamba_block_scores(
    projected: torch.Tensor,
    mixer,
    query_rows: torch.Tensor,
    queries: Varlen,
    keys: Varlen,
    visual_rows: torch.Tensor,
    use_dt: bool,
    decay: bool,
) -> torch.Tensor:
    """(R, V) proxy scores of the visual rows from the question rows; `projected` is the
    block's in_proj output of the stage's packed batch."""
    if decay:
        return tp_all_reduce(_decayed_scores(projected, mixer, query_rows, queries, keys, visual_rows, use_dt))
    width, num_visual = visual_rows.shape
    first_row = keys.device[0].long()  # (R,) first row of each request
    b = _segments_b(projected, mixer, keys, visual_rows)  # (R, V, G, N)
    c = _conv_channels_at(projected, mixer, "c", query_rows, _segment_of(first_row, queries))  # (T, G, N)
    flat = b.flatten(0, 1)  # (R*V, G, N): scored rows packed request by request
    rows = torch.arange(width * num_visual, device=b.device).view(width, num_visual).masked_fill(visual_rows < 0, -1)
    weight = None
    if use_dt:  # per group: the summed dt of its heads
        dt = mamba_dt(projected, mixer, visual_rows.clamp_min(0).flatten())  # (R*V, H)
        weight = dt.view(width * num_visual, b.shape[-2], -1).sum(-1)
    return tp_all_reduce(kernels_for(projected).mamba_scores(c, flat, weight, queries, rows))


def mamba_bc_dt(projected: torch.Tensor, mixer, rows: torch.Tensor, first_row: torch.Tensor):
    """B, C (..., G, N) after conv1d + SiLU and dt (..., H) after softplus at `rows` of
    the packed in_proj output, each row's conv window starting at `first_row` (its
    request's first row: a fresh prefill starts from a zero conv state)."""
    b = _conv_channels_at(projected, mixer, "b", rows, first_row)
    c = _conv_channels_at(projected, mixer, "c", rows, first_row)
    return b, c, mamba_dt(projected, mixer, rows.flatten()).view(*rows.shape, -1)


def mamba_dt(projected: torch.Tensor, mixer, rows: torch.Tensor) -> torch.Tensor:
    """(rows, H) float32 step sizes softplus(dt + dt_bias) at `rows`."""
    inner, conv = mixer.tped_intermediate_size, mixer.tped_conv_size
    return F.softplus(projected[:, inner + conv :].index_select(0, rows).float() + mixer.dt_bias.float())


def _conv_inputs(projected: torch.Tensor, mixer, which: str):
    """(x (L, C), weight (C, W), bias (C,) or None) of the B or C channels of the conv."""
    inner, conv, groups_n = (
        mixer.tped_intermediate_size,
        mixer.tped_conv_size,
        mixer.groups_ssm_state_size // mixer.tp_size,
    )
    channels = slice(conv - 2 * groups_n, conv - groups_n) if which == "b" else slice(conv - groups_n, conv)
    bias = mixer.conv1d.bias[channels] if mixer.conv1d.bias is not None else None
    return projected[:, inner : inner + conv][:, channels], mixer.conv1d.weight.reshape(conv, -1)[channels], bias


def _groups(mixer) -> int:
    return mixer.n_groups // mixer.tp_size  # the model refuses TP sizes that do not divide n_groups


def _conv_channels_at(
    projected: torch.Tensor, mixer, which: str, rows: torch.Tensor, first_row: torch.Tensor
) -> torch.Tensor:
    """B or C (..., G, N) at `rows`, window by window (cheap for a few rows, such as the
    question rows; `_segments_b` serves the many visual rows)."""
    x, weight, bias = _conv_inputs(projected, mixer, which)
    return _causal_conv_silu_at(x, weight, bias, rows, first_row).view(*rows.shape, _groups(mixer), -1)


def _segments_b(projected: torch.Tensor, mixer, keys: Varlen, visual_rows: torch.Tensor) -> torch.Tensor:
    """B (R, V, G, N) at the visual rows, by the conv over each request's whole segment:
    segments are copied apart with W-1 zero rows before each (a fresh prefill's conv
    state), then the W taps are W shifted multiply-adds over contiguous rows."""
    x, weight, bias = _conv_inputs(projected, mixer, "b")
    taps, (width, num_visual) = weight.shape[-1], visual_rows.shape
    gap, total, device = taps - 1, sum(keys.lengths), x.device
    starts, lengths = keys.device[0].long(), keys.device[1].long()
    request = torch.repeat_interleave(torch.arange(width, device=device), lengths, output_size=total)
    first = torch.cumsum(lengths, 0) - lengths  # packed offset of each segment
    padded_first = first + gap * torch.arange(1, width + 1, device=device)  # after its zero rows
    within = torch.arange(total, device=device) - first[request]
    padded = x.new_zeros((total + gap * width, x.shape[-1]), dtype=torch.float32)
    padded[padded_first[request] + within] = x.index_select(0, starts[request] + within).float()
    w = weight.float()
    out = padded[: total + gap * (width - 1)] * w[:, 0]  # out[i] is the conv at padded row i + gap
    for k in range(1, taps):
        out.addcmul_(padded[k : k + len(out)], w[:, k])
    at = (visual_rows - starts[:, None] + padded_first[:, None] - gap).clamp_min(0)
    return _silu_with_bias(out.index_select(0, at.flatten()), bias).view(width, num_visual, _groups(mixer), -1)


def _causal_conv_silu_at(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor, first_row: torch.Tensor
) -> torch.Tensor:
    """silu(sum_k weight[:, k] * x[row - (W-1-k)] + bias) at each of `rows`, taps before
    `first_row` reading zeros: the depthwise causal conv1d of the scan, row by row.
    x: (L, C); weight: (C, W); rows, first_row: same shape (...); returns (..., C) float32.
    One gather of each row's window, one masked multiply-add (memory-bound: few passes)."""
    taps = weight.shape[-1]
    source = rows[..., None] - torch.arange(taps - 1, -1, -1, device=rows.device)  # (..., W)
    window = x.index_select(0, source.clamp_min(0).flatten()).view(*source.shape, x.shape[-1])  # (..., W, C)
    window = window.masked_fill((source < first_row[..., None])[..., None], 0)
    return _silu_with_bias((window * weight.float().T).sum(-2), bias)  # (..., C) float32


def _silu_with_bias(conv_out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.silu(conv_out + bias.float() if bias is not None else conv_out)


def _segment_of(first_row: torch.Tensor, queries: Varlen) -> torch.Tensor:
    """(T,) each question row's request's first row."""
    return torch.repeat_interleave(first_row, queries.device[1].long(), output_size=sum(queries.lengths))


def _decayed_scores(
    projected, mixer, query_rows, queries: Varlen, keys: Varlen, visual_rows, use_dt: bool
) -> torch.Tensor:
    """The ablation the paper argues against: |C_t.B_s| dt_s exp(A_h (cs_t - cs_s)) summed
    over heads, cs = cumsum(dt) over the request's rows. Torch only, one request at a time."""
    out = torch.zeros(visual_rows.shape, dtype=torch.float32, device=projected.device)
    a = mixer.A.float()
    for r, (k0, nk, q0, nq) in enumerate(zip(keys.starts, keys.lengths, queries.starts, queries.lengths, strict=True)):
        rows = torch.arange(k0, k0 + nk, device=projected.device)
        b, c, dt = mamba_bc_dt(projected, mixer, rows, torch.full_like(rows, k0))
        q_local = query_rows[q0 : q0 + nq] - k0
        valid = visual_rows[r] >= 0
        v_local = (visual_rows[r] - k0).clamp_min(0)
        out[r] = _decayed(b, c, dt, a, q_local, v_local, use_dt).masked_fill(~valid, 0.0)
    return out


def _decayed(b, c, dt, a, q_rows, v_rows, use_dt: bool, chunk: int = 16) -> torch.Tensor:
    groups, heads = b.shape[1], dt.shape[1]
    cs = torch.cumsum(dt, 0)  # (L, H)
    head_group = torch.arange(heads, device=b.device) // (heads // groups)
    out = torch.zeros(len(v_rows), dtype=torch.float32, device=b.device)
    for start in range(0, len(q_rows), chunk):
        t = q_rows[start : start + chunk]
        cb = torch.einsum("tgn,sgn->tsg", c[t].float(), b[v_rows].float()).abs()[..., head_group]  # (T,S,H)
        decay_ts = torch.exp(a[None, None] * (cs[t][:, None] - cs[v_rows][None]))
        w = cb * decay_ts * (dt[v_rows][None] if use_dt else 1.0)
        out += w.sum(dim=(0, 2))
    return out / len(q_rows)
