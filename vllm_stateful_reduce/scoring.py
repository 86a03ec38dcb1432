"""Language-aware importance of visual tokens, from the layer that just ran.

Attention block: mean softmax attention of the query rows (text after the last
visual token) over the request's keys, read at the visual columns. Mamba2 block:
the implicit-attention proxy |C_t . B_s| (x dt_s), without the exp(A * sum dt)
decay unless asked, with B and C recomputed from the layer's in_proj output through
its causal conv1d + SiLU exactly as the scan consumes them. Each block's scores over
a request's visual tokens are put on one scale (z-scores by default) so attention and
Mamba blocks add up. With tensor parallelism each rank holds a slice of the heads /
groups, so partial sums are all-reduced before anyone picks tokens.
"""

import torch
import torch.nn.functional as F

from .kernels import reference

try:  # Triton is optional: the CPU build runs the references
    from .kernels import triton_kernels
except Exception:  # pragma: no cover - depends on the install
    triton_kernels = None


def kernels_for(x: torch.Tensor):
    return triton_kernels if (x.is_cuda and triton_kernels is not None) else reference


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(x) if get_tensor_model_parallel_world_size() > 1 else x


def normalised(scores: torch.Tensor, how: str) -> torch.Tensor:
    """One block's scores over a request's visual tokens on the common scale (`score_norm`)."""
    if how == "sum":
        return scores / scores.sum().clamp_min(1e-30)
    if len(scores) < 2:
        return torch.zeros_like(scores)
    return (scores - scores.mean()) / scores.std().clamp_min(1e-30)


def attention_block_scores(
    qkv: torch.Tensor, q_rows: torch.Tensor, v_rows: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> torch.Tensor:
    """Scores of `v_rows` from the query rows `q_rows`; `qkv` holds one request's rows."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[q_rows, :q_size].view(-1, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(-1, num_kv_heads, head_dim)
    scores = kernels_for(qkv).attention_scores(q, k, q_rows, head_dim**-0.5)
    return tp_all_reduce(scores[v_rows])


def mamba_bc_dt(projected: torch.Tensor, mixer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B, C (L, G, N) after conv1d + SiLU and dt (L, H) after softplus, for one request's
    rows of `mixer.in_proj` output, starting from a zero conv state (a fresh prefill)."""
    inner, groups_n = mixer.tped_intermediate_size, mixer.groups_ssm_state_size // mixer.tp_size
    xbc = projected[:, inner : inner + mixer.tped_conv_size]
    dt_raw = projected[:, inner + mixer.tped_conv_size :]
    conv_w = mixer.conv1d.weight.reshape(mixer.tped_conv_size, -1)
    bc_channels = slice(mixer.tped_conv_size - 2 * groups_n, mixer.tped_conv_size)
    weight = conv_w[bc_channels].unsqueeze(1)
    bias = mixer.conv1d.bias[bc_channels] if mixer.conv1d.bias is not None else None
    width = weight.shape[-1]
    bc = F.conv1d(xbc[:, bc_channels].T.unsqueeze(0), weight, bias, padding=width - 1, groups=weight.shape[0])
    bc = F.silu(bc[0, :, : xbc.shape[0]].T)
    groups = mixer.n_groups // mixer.tp_size  # the model refuses TP sizes that do not divide n_groups
    b, c = bc.reshape(xbc.shape[0], 2, groups, -1).unbind(1)
    dt = F.softplus(dt_raw.float() + mixer.dt_bias.float())
    return b, c, dt


def mamba_block_scores(
    projected: torch.Tensor, mixer, q_rows: torch.Tensor, v_rows: torch.Tensor, use_dt: bool, decay: bool
) -> torch.Tensor:
    """Proxy scores of `v_rows` from `q_rows`; `projected` is one request's in_proj output."""
    b, c, dt = mamba_bc_dt(projected, mixer)
    groups, heads = b.shape[1], dt.shape[1]
    if decay:
        return tp_all_reduce(_decayed_mamba_scores(b, c, dt, mixer.A.float(), q_rows, v_rows, use_dt))
    weight = dt[v_rows].view(len(v_rows), groups, heads // groups).sum(-1) if use_dt else None
    return tp_all_reduce(kernels_for(projected).mamba_scores(c[q_rows], b[v_rows], weight))


def _decayed_mamba_scores(b, c, dt, a, q_rows, v_rows, use_dt: bool, chunk: int = 16) -> torch.Tensor:
    """The ablation the paper argues against: |C_t.B_s| dt_s exp(A_h (cs_t - cs_s)) summed
    over heads, cs = cumsum(dt). Torch only (T x S x H memory, chunked over T)."""
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
