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


def test_mamba_b_at_visual_rows_is_the_scan_conv() -> None:
    """B at the visual rows, both ways the scoring computes it (the whole-segment shifted
    conv of the hot path, and the window conv of `_conv_channels_at`), equals silu(conv1d)
    over each request's whole segment from a zero conv state (how vLLM's CPU conv runs a
    fresh prefill), read at those rows; three requests packed with other rows between."""
    import types

    import torch.nn.functional as F

    from vllm_stateful_reduce.kernels.torch_ops import Varlen
    from vllm_stateful_reduce.scoring import _conv_channels_at, _segments_b

    g = torch.Generator().manual_seed(3)
    inner, groups, n, heads, taps = 12, 2, 4, 3, 4
    conv = inner + 2 * groups * n
    conv1d = types.SimpleNamespace(weight=torch.randn(conv, 1, taps, generator=g), bias=torch.randn(conv, generator=g))
    mixer = types.SimpleNamespace(
        tped_intermediate_size=inner, groups_ssm_state_size=groups * n, tp_size=1, tped_conv_size=conv, n_groups=groups,
        conv1d=conv1d,
    )  # fmt: skip
    projected = torch.randn(60, 2 * inner + 2 * groups * n + heads, generator=g)
    starts, lengths = [2, 20, 41], [15, 9, 19]
    visual = torch.tensor([[2, 3, 4, 10, 16], [20, 22, 28, -1, -1], [41, 45, 50, 58, 59]])
    first = torch.tensor(starts)[:, None].expand_as(visual)
    window = _conv_channels_at(projected, mixer, "b", visual.clamp_min(0), first)  # (R, V, G, N)
    segments = _segments_b(projected, mixer, Varlen.of(starts, lengths), visual)  # (R, V, G, N)
    channels = slice(inner + conv - 2 * groups * n, inner + conv - groups * n)
    for r, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        segment = projected[start : start + length, channels].T[None]  # (1, C, L) of this request
        weight, bias = (
            mixer.conv1d.weight[conv - 2 * groups * n : conv - groups * n],
            mixer.conv1d.bias[conv - 2 * groups * n : conv - groups * n],
        )
        scan = F.silu(F.conv1d(F.pad(segment, (taps - 1, 0)), weight, bias, groups=weight.shape[0]))[0].T  # (L, C)
        valid = visual[r] >= 0
        expected = scan[visual[r][valid] - start].view(-1, groups, n)
        for b in (window, segments):
            torch.testing.assert_close(b[r][valid], expected, atol=1e-6, rtol=1e-5)
