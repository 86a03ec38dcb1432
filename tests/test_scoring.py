"""How a block's scores are put on the common scale before a stage sums them."""

import pytest
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
            zscore = (row - row.mean()) / row.std() if n > 1 else torch.zeros(n)
            want = row / row.sum() if how == "sum" else zscore
            torch.testing.assert_close(out[r, :n], want, atol=1e-6, rtol=1e-5)


def test_attention_score_reference_is_the_formula() -> None:
    """The reference kernel against the definition written out per query row and head:
    two requests, GQA, causal question rows at the end, padding."""
    from vllm_stateful_reduce.kernels.torch_ops import Varlen, attention_scores

    g = torch.Generator().manual_seed(2)
    hq, hk, d = 6, 2, 8
    lengths, questions = [23, 9], [4, 3]
    k = torch.randn(sum(lengths) + 5, hk, d, generator=g)  # 5 rows of another request between
    starts = [0, lengths[0] + 5]
    q = torch.randn(sum(questions), hq, d, generator=g)
    v_rows = torch.tensor([[1, 5, 7, 18, -1], [starts[1] + 0, starts[1] + 2, starts[1] + 4, -1, -1]])
    out = attention_scores(q, k, Varlen.of([0, 4], questions), Varlen.of(starts, lengths), v_rows, 0.3)
    for r in range(2):
        per_key = torch.zeros(lengths[r])
        for t in range(questions[r]):
            last = lengths[r] - questions[r] + t
            for h in range(hq):
                logits = k[starts[r] : starts[r] + last + 1, h // (hq // hk)] @ q[sum(questions[:r]) + t, h] * 0.3
                per_key[: last + 1] += torch.softmax(logits, 0)
        per_key /= questions[r] * hq
        for j, row in enumerate(v_rows[r].tolist()):
            want = per_key[row - starts[r]] if row >= 0 else torch.tensor(0.0)
            torch.testing.assert_close(out[r, j], want, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("decay", [False, True])
def test_mamba_scores_read_the_scan_rows(monkeypatch: pytest.MonkeyPatch, decay: bool) -> None:
    """The proxy from the B and C the scan consumed (prefill rows only, after 3 decode
    rows) against the formula written out per question row and head: two requests,
    padding, dt weights, with and without the decay."""
    import types

    from vllm_stateful_reduce import scoring
    from vllm_stateful_reduce.kernels.torch_ops import Varlen

    monkeypatch.setattr(scoring, "tp_all_reduce", lambda x: x)  # no TP group outside an engine; one rank
    g = torch.Generator().manual_seed(3)
    inner, groups, n, heads, decodes = 8, 2, 4, 4, 3
    conv = inner + 2 * groups * n
    mixer = types.SimpleNamespace(
        tped_intermediate_size=inner, tped_conv_size=conv, n_groups=groups, tp_size=1,
        dt_bias=torch.randn(heads, generator=g), A=-torch.rand(heads, generator=g),
    )  # fmt: skip
    projected = torch.randn(decodes + 40, inner + conv + heads, generator=g)
    scan = scoring.MambaProjection(
        projected, torch.randn(40, groups * n, generator=g), torch.randn(40, groups * n, generator=g), decodes
    )
    starts, lengths, nq = [decodes, decodes + 20], [20, 20], 3
    query_rows = torch.tensor([s + size - nq + t for s, size in zip(starts, lengths, strict=True) for t in range(nq)])
    visual = torch.tensor([[4, 6, 10, -1], [25, 26, 30, 31]])
    out = scoring.mamba_block_scores(
        scan, mixer, query_rows, Varlen.of([0, nq], [nq, nq]), Varlen.of(starts, lengths), visual, True, decay
    )
    dt = torch.nn.functional.softplus(projected[:, inner + conv :] + mixer.dt_bias)  # (rows, H)
    b, c = (x.view(-1, groups, n) for x in (scan.b, scan.c))
    for r, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        cumulative = dt[start : start + length].cumsum(0)
        for j, s_row in enumerate(visual[r].tolist()):
            want = torch.tensor(0.0)
            for t_row in query_rows[r * nq : (r + 1) * nq].tolist():
                for h in range(heads):
                    grp = h // (heads // groups)
                    term = (c[t_row - decodes, grp] @ b[s_row - decodes, grp]).abs() * dt[s_row, h]
                    if decay:
                        since = cumulative[t_row - start, h] - cumulative[s_row - start, h]
                        term = term * torch.exp(mixer.A[h] * since)
                    want = want + term / nq
            torch.testing.assert_close(out[r, j], want if s_row >= 0 else torch.tensor(0.0), atol=1e-6, rtol=1e-5)
