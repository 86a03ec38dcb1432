"""Triton versions of `torch_ops.py` (same signatures and results).

The scoring kernels read each request's segment from the device tables
(`Varlen.device`); the host tuples only size the grids. Every sum runs in a fixed
order inside one program (no float atomics across programs), so two launches give
bitwise equal scores. Row offsets are int64: 32k rows x 5120 columns overflow int32
element offsets. Head / state sizes need not be powers of two (the tail is masked).
"""

import torch
import triton
import triton.language as tl

from .torch_ops import Varlen

_MIN_DOT = 16  # tl.dot needs every tile side >= 16


def _check_same_device(anchor_name: str, anchor: torch.Tensor, others: dict[str, torch.Tensor | None]) -> None:
    """A kernel handed a host tensor on the GPU reads garbage or faults: refuse it here."""
    for name, t in others.items():
        if t is not None and t.device != anchor.device:
            raise ValueError(
                f"{name} is on {t.device} but {anchor_name} is on {anchor.device}: every tensor a Triton "
                f"kernel reads must be on the same device (move index tables there before the launch)"
            )


def _table(name: str, varlen: Varlen, rows: int) -> torch.Tensor:
    """The (2, R) device table with unit column stride, as `_segment` reads it."""
    if varlen.device.shape != (2, len(varlen)) or len(varlen) != rows:
        raise ValueError(f"{name}: expected a (2, {rows}) device table, got {tuple(varlen.device.shape)}")
    return varlen.device.contiguous()


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Kernels index the last dimension with unit stride; views such as a qkv split already are."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _native_dot(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Feed bf16/fp16 tiles to tl.dot as they are (exact products, float32 accumulation).

    Float32 inputs, and any input under TRITON_INTERPRET (whose tl.dot multiplies bf16
    tiles as raw uint16 bits in Triton 3.9), are upcast and multiplied in IEEE float32.
    """
    half = a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16)
    return half and not triton.knobs.runtime.interpret


def _tile(size: int) -> int:
    """Power-of-two tile covering `size`, at least what tl.dot accepts."""
    return max(_MIN_DOT, triton.next_power_of_2(size))


@triton.jit
def _dot_f32(a, b, NATIVE: tl.constexpr):
    """a @ b accumulated in float32, never through TF32."""
    if NATIVE:
        out = tl.dot(a, b, out_dtype=tl.float32)
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return out


@triton.jit
def _gather_rows_kernel(x_ptr, idx_ptr, out_ptr, D, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    src = tl.load(idx_ptr + row).to(tl.int64)
    mask = cols < D
    vals = tl.load(x_ptr + src * stride_x + cols, mask=mask)
    tl.store(out_ptr + row.to(tl.int64) * stride_out + cols, vals, mask=mask)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[i] = x[index[i]] (compaction of hidden states / residuals)."""
    _check_same_device("x", x, {"index": index})
    x2 = x.reshape(x.shape[0], -1).contiguous()
    out = torch.empty((index.numel(), x2.shape[1]), dtype=x.dtype, device=x.device)
    if index.numel():
        block = min(1024, triton.next_power_of_2(x2.shape[1]))
        grid = (index.numel(), triton.cdiv(x2.shape[1], block))
        _gather_rows_kernel[grid](x2, index, out, x2.shape[1], x2.stride(0), out.stride(0), BLOCK=block)
    return out.reshape(index.numel(), *x.shape[1:])


@triton.jit
def _segment(tab_ptr, stride_tab, r):
    """(start as int64, length) of request r from a (2, R) [starts; lengths] table."""
    start = tl.load(tab_ptr + r).to(tl.int64)
    length = tl.load(tab_ptr + stride_tab + r)
    return start, length


@triton.jit
def _attention_lse_kernel(
    q_ptr, k_ptr, lse_ptr, qtab_ptr, ktab_ptr, GROUP, D, scale,
    stride_qtab, stride_ktab, stride_qt, stride_qh, stride_ks, stride_kh, stride_lse,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NATIVE: tl.constexpr,
):  # fmt: skip
    """Pass 1, program (request, block of query rows x heads, KV head): log-sum-exp of
    each (query row, head) over its visible keys, with an online max over key tiles.
    The BLOCK_M rows are (query row, head of the KV head's group) pairs, so one K tile
    serves the whole GQA group."""
    r, mblock, kh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q0, nq = _segment(qtab_ptr, stride_qtab, r)
    k0, nk = _segment(ktab_ptr, stride_ktab, r)
    m = mblock * BLOCK_M + tl.arange(0, BLOCK_M)  # (M,)
    t, h = m // GROUP, kh * GROUP + m % GROUP  # query row in the request, query head
    row_ok = m < nq * GROUP
    last = nk - nq + t  # (M,) last key a row sees (its own position)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    q_off = (q0 + t)[:, None] * stride_qt + h[:, None] * stride_qh + dd[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (M, BD)
    # keys up to what the block's last valid row sees; none for a block past the request
    t_hi = tl.minimum((mblock * BLOCK_M + BLOCK_M - 1) // GROUP, nq - 1)
    n_end = tl.where(mblock * BLOCK_M < nq * GROUP, nk - nq + t_hi + 1, 0)
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    denom = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, n_end, BLOCK_N):
        s = start + tl.arange(0, BLOCK_N)  # (N,) key index in the request
        k_off = (k0 + s)[None, :] * stride_ks + kh * stride_kh + dd[:, None]
        kt = tl.load(k_ptr + k_off, mask=(s < nk)[None, :] & d_ok[:, None], other=0.0)  # (BD, N)
        visible = (s[None, :] <= last[:, None]) & (s < nk)[None, :]
        logit = tl.where(visible, _dot_f32(q, kt, NATIVE) * scale, float("-inf"))  # (M, N)
        new_max = tl.maximum(run_max, tl.max(logit, axis=1))
        denom = denom * tl.exp(run_max - new_max) + tl.sum(tl.exp(logit - new_max[:, None]), axis=1)
        run_max = new_max
    lse_off = (q0 + t) * stride_lse + h
    tl.store(lse_ptr + lse_off, run_max + tl.log(denom), mask=row_ok)


@triton.jit
def _attention_colsum_kernel(
    q_ptr, k_ptr, lse_ptr, v_ptr, out_ptr, qtab_ptr, ktab_ptr, Hk, GROUP, D, V, scale, norm_heads,
    stride_qtab, stride_ktab, stride_qt, stride_qh, stride_ks, stride_kh, stride_lse,
    stride_vr, stride_vj, stride_or,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, NATIVE: tl.constexpr,
):  # fmt: skip
    """Pass 2, program (request, tile of its scored rows): sum over the request's query
    rows and heads of exp(q.k * scale - lse), divided by T_r * Hq; writes out directly."""
    r, vblock = tl.program_id(0), tl.program_id(1)
    q0, nq = _segment(qtab_ptr, stride_qtab, r)
    k0, nk = _segment(ktab_ptr, stride_ktab, r)
    j = vblock * BLOCK_V + tl.arange(0, BLOCK_V)  # (V,)
    j_ok = j < V
    cols = tl.load(v_ptr + r * stride_vr + j * stride_vj, mask=j_ok, other=-1).to(tl.int64)
    scored = cols >= 0
    s = tl.minimum(tl.maximum(cols - k0, 0), nk - 1)  # key index in the request, clamped like torch_ops
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    acc = tl.zeros((BLOCK_V,), tl.float32)
    for kh in range(0, Hk):
        k_off = (k0 + s)[None, :] * stride_ks + kh * stride_kh + dd[:, None]
        kt = tl.load(k_ptr + k_off, mask=scored[None, :] & d_ok[:, None], other=0.0)  # (BD, V)
        for m0 in range(0, nq * GROUP, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)  # (M,) (query row, head of the group) pairs
            t, h = m // GROUP, kh * GROUP + m % GROUP
            row_ok = m < nq * GROUP
            q_off = (q0 + t)[:, None] * stride_qt + h[:, None] * stride_qh + dd[None, :]
            q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (M, BD)
            lse = tl.load(lse_ptr + (q0 + t) * stride_lse + h, mask=row_ok, other=0.0)
            visible = row_ok[:, None] & (s[None, :] <= (nk - nq + t)[:, None])
            prob = tl.exp(_dot_f32(q, kt, NATIVE) * scale - lse[:, None])  # (M, V)
            acc += tl.sum(tl.where(visible, prob, 0.0), axis=0)
    norm = tl.maximum(nq, 1).to(tl.float32) * norm_heads
    tl.store(out_ptr + r.to(tl.int64) * stride_or + j, tl.where(scored, acc / norm, 0.0), mask=j_ok)


def attention_scores(
    q: torch.Tensor, k: torch.Tensor, queries: Varlen, keys: Varlen, v_rows: torch.Tensor, scale: float
) -> torch.Tensor:
    """Mean softmax attention each scored key receives from its request's query rows
    (see `torch_ops.attention_scores`); two deterministic passes, never L x L."""
    _check_same_device("q", q, {"k": k, "v_rows": v_rows, "queries.device": queries.device, "keys.device": keys.device})
    (_, hq, d), (_, hk, dk) = q.shape, k.shape
    if d != dk or hq % hk:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: head sizes differ or {hq} % {hk} != 0")
    n_req, n_cols = v_rows.shape
    qtab, ktab = _table("queries", queries, n_req), _table("keys", keys, n_req)
    out = torch.empty((n_req, n_cols), dtype=torch.float32, device=q.device)
    if n_req == 0 or n_cols == 0:
        return out
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    group, native, block_d = hq // hk, _native_dot(q, k), _tile(d)
    lse = torch.empty((q.shape[0], hq), dtype=torch.float32, device=q.device)  # (T, Hq)
    max_rows = max(queries.lengths) * group
    if max_rows:
        block_m = 64
        _attention_lse_kernel[(n_req, triton.cdiv(max_rows, block_m), hk)](
            q, k, lse, qtab, ktab, group, d, float(scale),
            qtab.stride(0), ktab.stride(0), q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0),
            BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=block_d, NATIVE=native,
        )  # fmt: skip
    block_v = 64
    _attention_colsum_kernel[(n_req, triton.cdiv(n_cols, block_v))](
        q, k, lse, v_rows, out, qtab, ktab, hk, group, d, n_cols, float(scale), float(hq),
        qtab.stride(0), ktab.stride(0), q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0),
        v_rows.stride(0), v_rows.stride(1), out.stride(0),
        BLOCK_M=32, BLOCK_V=block_v, BLOCK_D=block_d, NATIVE=native,
    )  # fmt: skip
    return out


@triton.jit
def _mamba_scores_kernel(
    c_ptr, b_ptr, w_ptr, v_ptr, out_ptr, qtab_ptr, G, N, V,
    stride_qtab, stride_ct, stride_cg, stride_bs, stride_bg, stride_ws, stride_wg,
    stride_vr, stride_vj, stride_or,
    HAS_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr,
    NATIVE: tl.constexpr,
):  # fmt: skip
    """Program (request, tile of its scored rows): sum over groups and the request's
    query rows of |C.B| * weight, divided by T_r; writes out directly."""
    r, vblock = tl.program_id(0), tl.program_id(1)
    q0, nq = _segment(qtab_ptr, stride_qtab, r)
    j = vblock * BLOCK_V + tl.arange(0, BLOCK_V)  # (V,)
    j_ok = j < V
    cols = tl.load(v_ptr + r * stride_vr + j * stride_vj, mask=j_ok, other=-1).to(tl.int64)
    scored = cols >= 0
    rows = tl.maximum(cols, 0)
    nn = tl.arange(0, BLOCK_N)
    n_ok = nn < N
    acc = tl.zeros((BLOCK_V,), tl.float32)
    for g in range(0, G):
        b_off = rows[None, :] * stride_bs + g * stride_bg + nn[:, None]
        bt = tl.load(b_ptr + b_off, mask=scored[None, :] & n_ok[:, None], other=0.0)  # (BN, V)
        per_group = tl.zeros((BLOCK_V,), tl.float32)
        for t0 in range(0, nq, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)  # (T,) masked rows load 0 and add |0|
            c_off = (q0 + t)[:, None] * stride_ct + g * stride_cg + nn[None, :]
            c = tl.load(c_ptr + c_off, mask=(t < nq)[:, None] & n_ok[None, :], other=0.0)  # (T, BN)
            per_group += tl.sum(tl.abs(_dot_f32(c, bt, NATIVE)), axis=0)
        if HAS_W:
            per_group *= tl.load(w_ptr + rows * stride_ws + g * stride_wg, mask=scored, other=0.0).to(tl.float32)
        acc += per_group
    norm = tl.maximum(nq, 1).to(tl.float32)
    tl.store(out_ptr + r.to(tl.int64) * stride_or + j, tl.where(scored, acc / norm, 0.0), mask=j_ok)


def mamba_scores(
    c: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None, queries: Varlen, v_rows: torch.Tensor
) -> torch.Tensor:
    """Implicit-attention proxy of Mamba2 without the decay (see `torch_ops.mamba_scores`)."""
    _check_same_device("c", c, {"b": b, "weight": weight, "v_rows": v_rows, "queries.device": queries.device})
    (_, groups, n), (_, groups_b, n_b) = c.shape, b.shape
    if (groups, n) != (groups_b, n_b):
        raise ValueError(f"c {tuple(c.shape)} and b {tuple(b.shape)} differ in groups or state size")
    n_req, n_cols = v_rows.shape
    qtab = _table("queries", queries, n_req)
    out = torch.empty((n_req, n_cols), dtype=torch.float32, device=c.device)
    if n_req == 0 or n_cols == 0:
        return out
    c, b = _last_dim_contiguous(c), _last_dim_contiguous(b)
    w = weight if weight is not None else b  # placeholder pointer, never read without HAS_W
    block_v = 64
    _mamba_scores_kernel[(n_req, triton.cdiv(n_cols, block_v))](
        c, b, w, v_rows, out, qtab, groups, n, n_cols,
        qtab.stride(0), c.stride(0), c.stride(1), b.stride(0), b.stride(1), w.stride(0), w.stride(1),
        v_rows.stride(0), v_rows.stride(1), out.stride(0),
        HAS_W=weight is not None, BLOCK_T=_MIN_DOT, BLOCK_V=block_v, BLOCK_N=_tile(n), NATIVE=_native_dot(c, b),
    )  # fmt: skip
    return out
