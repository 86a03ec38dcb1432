"""Language-aware importance of visual tokens, from the block that just ran.

Attention block: mean softmax attention of the query rows (text after the last
visual token) over the request's keys, read at the visual columns. Mamba2 block:
the implicit-attention proxy |C_t . B_s| (x dt_s), without the exp(A * sum dt)
decay unless asked, with B and C after conv1d + SiLU as the block's scan consumed them
(taken from its forward, not recomputed). Each block's scores over a request's visual
tokens are put on one scale (z-scores by default) so attention and Mamba blocks add up.

All reducing requests of a step are scored in one call per block (varlen, sizes from
the plan), on the hidden states' device. With tensor parallelism each rank holds a
slice of the heads / groups, so partial sums are all-reduced before anyone picks.
"""

from types import ModuleType

import torch
import torch.nn.functional as F

from .adapter.mixer_taps import MambaProjection
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
    scan: MambaProjection,
    mixer,
    query_rows: torch.Tensor,
    queries: Varlen,
    keys: Varlen,
    visual_rows: torch.Tensor,
    use_dt: bool,
    decay: bool,
) -> torch.Tensor:
    """(R, V) proxy scores of the visual rows from the question rows."""
    if decay:
        return tp_all_reduce(_decayed_scores(scan, mixer, query_rows, queries, keys, visual_rows, use_dt))
    groups = _groups(mixer)
    b = scan.b.unflatten(-1, (groups, -1))  # (P, G, N): every prefill row, not copied
    c = _scan_rows(scan.c, query_rows, scan.first_row, groups)  # (T, G, N)
    rows = (visual_rows - scan.first_row).masked_fill(visual_rows < 0, -1)  # into b
    weight = None
    if use_dt:  # per group: the summed dt of its heads
        weight = mamba_dt(scan.projected[scan.first_row :], mixer).unflatten(-1, (groups, -1)).sum(-1)  # (P, G)
    return tp_all_reduce(kernels_for(b).mamba_scores(c, b, weight, queries, rows))


def mamba_dt(projected: torch.Tensor, mixer) -> torch.Tensor:
    """(rows, H) float32 step sizes softplus(dt + dt_bias) of in_proj output rows."""
    inner, conv = mixer.tped_intermediate_size, mixer.tped_conv_size
    return F.softplus(projected[:, inner + conv :].float() + mixer.dt_bias.float())


def _scan_rows(x: torch.Tensor, rows: torch.Tensor, first_row: int, groups: int) -> torch.Tensor:
    """(..., G, N) float32 rows of B or C at packed `rows` (padding, -1, reads a real row)."""
    return x.index_select(0, (rows - first_row).clamp_min(0).flatten()).float().view(*rows.shape, groups, -1)


def _groups(mixer) -> int:
    return mixer.n_groups // mixer.tp_size  # the model refuses TP sizes that do not divide n_groups


def _decayed_scores(
    scan: MambaProjection, mixer, query_rows, queries: Varlen, keys: Varlen, visual_rows, use_dt: bool
) -> torch.Tensor:
    """The ablation the paper argues against: |C_t.B_s| dt_s exp(A_h (cs_t - cs_s)) summed
    over heads, cs = cumsum(dt) over the request's rows. Torch only, one request at a time."""
    out = torch.zeros(visual_rows.shape, dtype=torch.float32, device=scan.b.device)
    a = mixer.A.float()
    for r, (k0, nk, q0, nq) in enumerate(zip(keys.starts, keys.lengths, queries.starts, queries.lengths, strict=True)):
        rows = torch.arange(k0, k0 + nk, device=scan.b.device)
        b, c = (_scan_rows(x, rows, scan.first_row, _groups(mixer)) for x in (scan.b, scan.c))
        dt = mamba_dt(scan.projected[k0 : k0 + nk], mixer)
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
