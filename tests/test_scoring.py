"""How a block's scores are put on the common scale before a stage sums them."""

import torch

from vllm_stateful_reduce.scoring import normalised


def test_zscore_and_sum_normalisation_keep_the_order() -> None:
    scores = torch.rand(97, generator=torch.Generator().manual_seed(0)) * 1e-3 + 5e-3  # nearly flat, like softmax
    z, s = normalised(scores, "zscore"), normalised(scores, "sum")
    assert torch.equal(z.argsort(), scores.argsort()) and torch.equal(s.argsort(), scores.argsort())
    assert abs(z.mean().item()) < 1e-5 and abs(z.std().item() - 1) < 1e-5
    assert abs(s.sum().item() - 1) < 1e-5
    # a flat block barely moves a summed ranking under "sum", but gets an equal say under "zscore"
    peaked = torch.zeros(97)
    peaked[3] = 1.0
    assert (normalised(scores, "sum") + normalised(peaked, "sum")).argmax() == 3
    assert z.abs().max() > 1.5
    assert torch.equal(normalised(torch.tensor([0.7]), "zscore"), torch.zeros(1))
