"""Triton kernels against their PyTorch references on random inputs.

Collected by `test_triton_kernels_interpreted`, which runs this file in a fresh
interpreter with TRITON_INTERPRET=1 (Triton reads it when it is first imported,
and the test process has imported it already without).

Each scoring case packs several requests of different lengths into one launch, with
gap rows between segments (so the kernels must read the varlen tables) and -1
padding in `v_rows`. Under the interpreter bf16 tiles are upcast before tl.dot (see
`triton_kernels._native_dot`), so bf16 inputs match as tightly as float32 ones.

`VSR_KERNEL_DEVICE=cuda` (without the interpreter) runs the same cases compiled on a
GPU (`kernels/gpu_check.py`); inputs are made on the CPU from the same seeds, then moved.
"""

import os
from dataclasses import dataclass

import pytest
import torch

from vllm_stateful_reduce.kernels import torch_ops
from vllm_stateful_reduce.kernels.torch_ops import Varlen

GAP = 2  # unused rows between segments
DEVICE = torch.device(os.environ.get("VSR_KERNEL_DEVICE", "cpu"))


@pytest.fixture(scope="module")
def triton_kernels():
    from vllm_stateful_reduce.kernels import triton_kernels

    return triton_kernels


@dataclass(frozen=True)
class Packed:
    """Two varlen segment tables (query rows, key rows) and the scored rows per request."""

    queries: Varlen
    keys: Varlen
    v_rows: torch.Tensor  # (R, V) int64 absolute key rows, -1 pads
    whole: tuple[bool, ...]  # request r scores every one of its keys


def _segments(lengths: tuple[int, ...]) -> tuple[list[int], int]:
    """Starts of segments laid out with GAP rows before each, and the total row count."""
    starts, row = [], 0
    for n in lengths:
        starts.append(row + GAP)
        row += GAP + n
    return starts, row


def _packed(nk: tuple[int, ...], nq: tuple[int, ...], g: torch.Generator) -> Packed:
    """Request r scores a random subset of its keys (all of them for r = 0), sorted."""
    q_starts, _ = _segments(nq)
    k_starts, _ = _segments(nk)
    picks = []
    for r, (k0, n) in enumerate(zip(k_starts, nk, strict=True)):
        count = n if r == 0 else int(torch.randint(1, n + 1, (), generator=g))
        picks.append(k0 + torch.sort(torch.randperm(n, generator=g)[:count]).values)
    width = max(len(p) for p in picks) + 3  # every request gets some padding
    v_rows = torch.full((len(nk), width), -1, dtype=torch.int64)
    for r, p in enumerate(picks):
        v_rows[r, : len(p)] = p
    whole = tuple(len(p) == n for p, n in zip(picks, nk, strict=True))
    return Packed(
        Varlen.of(q_starts, list(nq), DEVICE), Varlen.of(k_starts, list(nk), DEVICE), v_rows.to(DEVICE), whole
    )


def _randn(rows: int, heads: int, dim: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    return torch.randn(rows, heads, dim, generator=g).to(dtype).to(DEVICE)


@pytest.mark.parametrize(
    "rows,shape,picks,dtype",
    [
        (37, (3, 5), 6, torch.float32),
        (1, (7,), 1, torch.float32),
        (129, (2, 300), 64, torch.float32),
        (50, (5120,), 33, torch.bfloat16),  # a hidden state row of the real model
    ],
)
def test_gather_rows(triton_kernels, rows, shape, picks, dtype) -> None:
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, *shape, generator=g).to(dtype).to(DEVICE)
    index = torch.randint(0, rows, (picks,), generator=g).to(DEVICE)
    assert torch.equal(triton_kernels.gather_rows(x, index), torch_ops.gather_rows(x, index))
    assert torch.equal(triton_kernels.gather_rows(x, index.int()), torch_ops.gather_rows(x, index))


# Tolerance rtol 2e-6, atol 1e-8. Measured (TRITON_INTERPRET=1, CPU; scores 7e-4..0.45) max |error| /
# max elementwise relative error: odd 7e-9 / 2.7e-7, tiny 1.5e-8 / 6e-8, mha-long 1.9e-9 / 3.1e-7,
# no-queries 1.5e-8 / 1.9e-7, real-fp32 7e-9 / 4.5e-7, real-bf16 7e-9 / 2.3e-7; padding exactly 0;
# sums over whole segments are 1 within 6e-8.
ATTENTION_CASES = {
    "odd": ((37, 5, 80), (4, 5, 1), 6, 3, 40, torch.float32),  # head_dim not a power of two
    "tiny": ((3,), (1,), 2, 2, 8, torch.float32),  # head_dim below the tl.dot minimum
    "mha-long": ((150, 70), (9, 70), 4, 4, 16, torch.float32),  # several key tiles, all rows queries
    "no-queries": ((20, 30), (0, 3), 2, 1, 32, torch.float32),
    "real-fp32": ((70, 33, 12), (7, 3, 12), 40, 8, 128, torch.float32),  # Nano 12B: 40 / 8 heads x 128
    "real-bf16": ((70, 33, 12), (7, 3, 12), 40, 8, 128, torch.bfloat16),
}


def _attention_inputs(name: str, seed: int = 0):
    nk, nq, hq, hk, d, dtype = ATTENTION_CASES[name]
    g = torch.Generator().manual_seed(seed)
    packed = _packed(nk, nq, g)
    q = _randn(_segments(nq)[1], hq, d, dtype, g)
    k = _randn(_segments(nk)[1], hk, d, dtype, g)
    return q, k, packed, d**-0.5


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_attention_scores(triton_kernels, name) -> None:
    q, k, p, scale = _attention_inputs(name)
    ours = triton_kernels.attention_scores(q, k, p.queries, p.keys, p.v_rows, scale)
    ref = torch_ops.attention_scores(q, k, p.queries, p.keys, p.v_rows, scale)
    assert ours.dtype == torch.float32 and ours.shape == p.v_rows.shape
    assert torch.equal(ours[p.v_rows < 0], torch.zeros_like(ours[p.v_rows < 0]))
    assert torch.allclose(ours, ref, rtol=2e-6, atol=1e-8), (ours - ref).abs().max()
    for r, whole in enumerate(p.whole):  # each query row's probabilities over its keys sum to 1
        if whole and p.queries.lengths[r]:
            assert abs(ours[r].sum().item() - 1.0) < 1e-5


# Tolerance rtol 2e-6, atol 1e-8 (float32 sums of |C.B| reordered). Measured (TRITON_INTERPRET=1, CPU)
# max |error| / max elementwise relative error: odd 1.9e-6 / 2.4e-7 (scores up to 9.5), tiny 4.8e-7 / 1.1e-7,
# no-queries 9.5e-7 / 2.4e-7, real-fp32 1.1e-5 / 2.7e-7 (scores up to 58), real-bf16 7.6e-6 / 1.8e-7,
# real-bf16-weight 7.6e-6 / 2.0e-7; padding exactly 0.
MAMBA_CASES = {
    "odd": ((37, 90), (4, 17), 2, 24, "fp32", torch.float32),  # N not a power of two, two query tiles
    "tiny": ((5,), (1,), 1, 8, None, torch.float32),  # N below the tl.dot minimum, no weight
    "no-queries": ((20, 30), (3, 0), 2, 16, "fp32", torch.float32),
    "real-fp32": ((60, 40, 9), (5, 3, 20), 8, 128, "fp32", torch.float32),  # Nano 12B: 8 groups x 128
    "real-bf16": ((60, 40, 9), (5, 3, 20), 8, 128, "fp32", torch.bfloat16),
    "real-bf16-weight": ((60, 40), (5, 3), 8, 128, "bf16", torch.bfloat16),
}


def _mamba_inputs(name: str, seed: int = 0):
    nk, nq, groups, n, weight, dtype = MAMBA_CASES[name]
    g = torch.Generator().manual_seed(seed)
    packed = _packed(nk, nq, g)
    c = _randn(_segments(nq)[1], groups, n, dtype, g)
    b = _randn(_segments(nk)[1], groups, n, dtype, g)
    w_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(weight)
    w = torch.rand(b.shape[0], groups, generator=g).add(0.1).to(w_dtype).to(DEVICE) if w_dtype else None
    return c, b, w, packed


@pytest.mark.parametrize("name", list(MAMBA_CASES))
def test_mamba_scores(triton_kernels, name) -> None:
    c, b, w, p = _mamba_inputs(name)
    ours = triton_kernels.mamba_scores(c, b, w, p.queries, p.v_rows)
    ref = torch_ops.mamba_scores(c, b, w, p.queries, p.v_rows)
    assert ours.dtype == torch.float32 and ours.shape == p.v_rows.shape
    assert torch.equal(ours[p.v_rows < 0], torch.zeros_like(ours[p.v_rows < 0]))
    assert torch.allclose(ours, ref, rtol=2e-6, atol=1e-8), (ours - ref).abs().max()


def _strided(x: torch.Tensor) -> torch.Tensor:
    """The same values as a view with padded rows and column-major 2-d tables (like a qkv split's q)."""
    if x.dim() == 3:
        wide = torch.empty(x.shape[0], x.shape[1] + 1, x.shape[2], dtype=x.dtype, device=x.device)
        wide[:, : x.shape[1]] = x
        return wide[:, : x.shape[1]]
    return x.T.contiguous().T


def _strided_varlen(v: Varlen) -> Varlen:
    return Varlen(v.starts, v.lengths, _strided(v.device))


def test_scores_of_strided_views(triton_kernels) -> None:
    """Views (rows wider than their heads, column-major tables) give the same scores as contiguous inputs."""
    q, k, p, scale = _attention_inputs("real-bf16", seed=2)
    ours = triton_kernels.attention_scores(
        _strided(q), _strided(k), _strided_varlen(p.queries), _strided_varlen(p.keys), _strided(p.v_rows), scale
    )
    assert torch.equal(ours, triton_kernels.attention_scores(q, k, p.queries, p.keys, p.v_rows, scale))
    c, b, w, p = _mamba_inputs("odd", seed=2)
    ours = triton_kernels.mamba_scores(
        _strided(c), _strided(b), _strided(w), _strided_varlen(p.queries), _strided(p.v_rows)
    )
    assert torch.equal(ours, triton_kernels.mamba_scores(c, b, w, p.queries, p.v_rows))


def test_scores_are_deterministic(triton_kernels) -> None:
    """No atomics: two launches give the same bits."""
    q, k, p, scale = _attention_inputs("real-bf16", seed=1)
    first = triton_kernels.attention_scores(q, k, p.queries, p.keys, p.v_rows, scale)
    assert torch.equal(first, triton_kernels.attention_scores(q, k, p.queries, p.keys, p.v_rows, scale))
    c, b, w, p = _mamba_inputs("real-bf16", seed=1)
    first = triton_kernels.mamba_scores(c, b, w, p.queries, p.v_rows)
    assert torch.equal(first, triton_kernels.mamba_scores(c, b, w, p.queries, p.v_rows))


def test_refuses_tensors_on_another_device(triton_kernels) -> None:
    """The GPU path must never hand a kernel a host tensor; `meta` stands in for the other device here."""
    q, k, p, scale = _attention_inputs("tiny")
    with pytest.raises(ValueError, match="v_rows is on meta"):
        triton_kernels.attention_scores(q, k, p.queries, p.keys, p.v_rows.to("meta"), scale)
    meta_keys = Varlen(p.keys.starts, p.keys.lengths, p.keys.device.to("meta"))
    with pytest.raises(ValueError, match="keys.device is on meta"):
        triton_kernels.attention_scores(q, k, p.queries, meta_keys, p.v_rows, scale)
    c, b, w, p = _mamba_inputs("odd")
    with pytest.raises(ValueError, match="weight is on meta"):
        triton_kernels.mamba_scores(c, b, w.to("meta"), p.queries, p.v_rows)
    with pytest.raises(ValueError, match="index is on meta"):
        triton_kernels.gather_rows(c, torch.zeros(1, dtype=torch.int64, device="meta"))
