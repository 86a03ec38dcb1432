"""How a block's scores are put on the common scale before a stage sums them."""

import torch

from vllm_stateful_reduce.scoring import normalised


def one_row(scores: torch.Tensor, how: str) -> torch.Tensor:
    """`normalised` of a single request's scores (no padding)."""
    return normalised(scores[None], torch.ones(1, len(scores), dtype=torch.bool), how)[0]


def test_zscore_and_sum_normalisation_keep_the_order() -> None:
    scores = torch.rand(97, generator=torch.Generator().manual_seed(0)) * 1e-3 + 5e-3  # nearly flat, like softmax
    z, s = one_row(scores, "zscore"), one_row(scores, "sum")
    assert torch.equal(z.argsort(), scores.argsort()) and torch.equal(s.argsort(), scores.argsort())
    assert abs(z.mean().item()) < 1e-5 and abs(z.std().item() - 1) < 1e-5
    assert abs(s.sum().item() - 1) < 1e-5
    # a flat block barely moves a summed ranking under "sum", but gets an equal say under "zscore"
    peaked = torch.zeros(97)
    peaked[3] = 1.0
    assert (one_row(scores, "sum") + one_row(peaked, "sum")).argmax() == 3
    assert z.abs().max() > 1.5
    assert torch.equal(one_row(torch.tensor([0.7]), "zscore"), torch.zeros(1))


def test_padded_rows_normalise_like_each_request_alone() -> None:
    """A batch of requests with different visual counts (padded) gives each request the
    result of the textbook formula on its own scores; padding stays 0."""
    g = torch.Generator().manual_seed(1)
    lengths = [5, 40, 1, 17]
    scores = torch.rand(len(lengths), 40, generator=g) + 0.1
    valid = torch.arange(40)[None, :] < torch.tensor(lengths)[:, None]
    for how in ("zscore", "sum"):
        out = normalised(scores, valid, how)
        assert torch.all(out[~valid] == 0)
        for r, n in enumerate(lengths):
            row = scores[r, :n]
            if how == "sum":
                want = row / row.sum()
            else:
                want = (row - row.mean()) / row.std() if n > 1 else torch.zeros(n)
            torch.testing.assert_close(out[r, :n], want, atol=1e-6, rtol=1e-5)
