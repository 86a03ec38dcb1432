"""Triton versions of `reference.py` (same signatures and results)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(x_ptr, idx_ptr, out_ptr, D, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    src = tl.load(idx_ptr + row).to(tl.int64)
    mask = cols < D
    vals = tl.load(x_ptr + src * stride_x + cols, mask=mask)
    tl.store(out_ptr + row.to(tl.int64) * stride_out + cols, vals, mask=mask)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(x.shape[0], -1).contiguous()
    out = torch.empty((index.numel(), x2.shape[1]), dtype=x.dtype, device=x.device)
    if index.numel():
        block = min(1024, triton.next_power_of_2(x2.shape[1]))
        grid = (index.numel(), triton.cdiv(x2.shape[1], block))
        _gather_rows_kernel[grid](x2, index, out, x2.shape[1], x2.stride(0), out.stride(0), BLOCK=block)
    return out.reshape(index.numel(), *x.shape[1:])


@triton.jit
def _attention_scores_kernel(
    q_ptr, k_ptr, pos_ptr, out_ptr, L, Hq, GROUP, scale, norm,
    stride_qt, stride_qh, stride_ks, stride_kh,
    D: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    h = tl.program_id(1)
    kh = h // GROUP
    d = tl.arange(0, D)
    q = tl.load(q_ptr + t * stride_qt + h * stride_qh + d).to(tl.float32)
    last = tl.load(pos_ptr + t)
    # pass 1: online max and normaliser over the visible keys
    m = tl.full((), float("-inf"), tl.float32)
    denom = tl.zeros((), tl.float32)
    for start in range(0, L, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        visible = (s <= last) & (s < L)
        k = tl.load(k_ptr + s[:, None] * stride_ks + kh * stride_kh + d[None, :], mask=visible[:, None], other=0.0)
        logit = tl.where(visible, tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(logit, axis=0))
        denom = denom * tl.exp(m - m_new) + tl.sum(tl.exp(logit - m_new), axis=0)
        m = m_new
    # pass 2: add this row's probabilities into the per-key sum
    for start in range(0, L, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        visible = (s <= last) & (s < L)
        k = tl.load(k_ptr + s[:, None] * stride_ks + kh * stride_kh + d[None, :], mask=visible[:, None], other=0.0)
        logit = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
        p = tl.where(visible, tl.exp(logit - m) / denom, 0.0)
        tl.atomic_add(out_ptr + s, p * norm, mask=visible)


def attention_scores(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    t, hq, d = q.shape
    length, hk, _ = k.shape
    if d != triton.next_power_of_2(d):
        raise ValueError(f"head_dim {d} must be a power of two for the Triton kernel")
    out = torch.zeros(length, dtype=torch.float32, device=q.device)
    q, k = q.contiguous(), k.contiguous()
    pos = q_pos.to(device=q.device, dtype=torch.int32).contiguous()
    _attention_scores_kernel[(t, hq)](
        q, k, pos, out, length, hq, hq // hk, float(scale), 1.0 / (t * hq),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), D=d, BLOCK_S=64,
    )  # fmt: skip
    return out


@triton.jit
def _mamba_scores_kernel(
    c_ptr, b_ptr, w_ptr, out_ptr, T, L, G,
    stride_ct, stride_cg, stride_bs, stride_bg, stride_ws,
    HAS_W: tl.constexpr, N: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    sblock = tl.program_id(0)
    g = tl.program_id(1)
    s = sblock * BLOCK_S + tl.arange(0, BLOCK_S)
    n = tl.arange(0, N)
    valid = s < L
    b = tl.load(b_ptr + s[:, None] * stride_bs + g * stride_bg + n[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_S,), tl.float32)
    for t in range(0, T):
        c = tl.load(c_ptr + t * stride_ct + g * stride_cg + n).to(tl.float32)
        acc += tl.abs(tl.sum(b * c[None, :], axis=1))
    if HAS_W:
        acc *= tl.load(w_ptr + s * stride_ws + g, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + g * L + s, acc / T, mask=valid)


def mamba_scores(c: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    t, g, n = c.shape
    length = b.shape[0]
    if n != triton.next_power_of_2(n):
        raise ValueError(f"ssm_state_size {n} must be a power of two for the Triton kernel")
    c, b = c.contiguous(), b.contiguous()
    w = weight.contiguous() if weight is not None else b  # dummy pointer when unused
    partial = torch.empty((g, length), dtype=torch.float32, device=c.device)
    block = 64
    _mamba_scores_kernel[(triton.cdiv(length, block), g)](
        c, b, w, partial, t, length, g,
        c.stride(0), c.stride(1), b.stride(0), b.stride(1), w.stride(0),
        HAS_W=weight is not None, N=n, BLOCK_S=block,
    )  # fmt: skip
    return partial.sum(0)
