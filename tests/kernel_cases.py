"""Triton kernels against their PyTorch references on random inputs.

Collected by `test_triton_kernels_interpreted`, which runs this file in a fresh
interpreter with TRITON_INTERPRET=1 (Triton reads it when it is first imported,
and the test process has imported it already without).
"""

import pytest
import torch

from vllm_stateful_reduce.kernels import reference


@pytest.fixture(scope="module")
def triton_kernels():
    from vllm_stateful_reduce.kernels import triton_kernels

    return triton_kernels


@pytest.mark.parametrize("rows,shape,picks", [(37, (3, 5), 6), (1, (7,), 1), (129, (2, 300), 64)])
def test_gather_rows(triton_kernels, rows, shape, picks) -> None:
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, *shape, generator=g)
    index = torch.randint(0, rows, (picks,), generator=g)
    assert torch.equal(triton_kernels.gather_rows(x, index), reference.gather_rows(x, index))


@pytest.mark.parametrize("t,length,hq,hk,d", [(5, 77, 4, 2, 32), (1, 3, 2, 2, 16), (9, 130, 8, 1, 64)])
def test_attention_scores(triton_kernels, t, length, hq, hk, d) -> None:
    g = torch.Generator().manual_seed(length)
    q, k = torch.randn(t, hq, d, generator=g), torch.randn(length, hk, d, generator=g)
    q_pos = torch.sort(torch.randint(0, length, (t,), generator=g)).values
    ours, ref = triton_kernels.attention_scores(q, k, q_pos, d**-0.5), reference.attention_scores(q, k, q_pos, d**-0.5)
    # measured max error 6e-8; each query row's probabilities sum to 1
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)
    assert abs(ref.sum().item() - 1.0) < 1e-5


@pytest.mark.parametrize("t,length,groups,n,weighted", [(6, 101, 2, 16, True), (1, 5, 1, 8, False), (13, 200, 4, 32, True)])
def test_mamba_scores(triton_kernels, t, length, groups, n, weighted) -> None:
    g = torch.Generator().manual_seed(length)
    c, b = torch.randn(t, groups, n, generator=g), torch.randn(length, groups, n, generator=g)
    w = torch.rand(length, groups, generator=g) if weighted else None
    ours, ref = triton_kernels.mamba_scores(c, b, w), reference.mamba_scores(c, b, w)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-6)  # measured max error 2e-6 at |score| ~ 17
