"""Budget -> keep counts, and config validation (no engine)."""

from itertools import pairwise

import pytest

from vllm_stateful_reduce.config import from_additional_config, parse
from vllm_stateful_reduce.schedule import build_schedule, stage_sizes

NANO = "M-M-M-M*-" * 6 + "M-M-M-M-M-M-M-M-"  # 70 blocks with the real model's block mix
SMALL = "M*-M-M*-M-M*-"


@pytest.mark.parametrize("pattern", [NANO, SMALL])
@pytest.mark.parametrize("schedule", ["sigmoid", "step", "geometric"])
@pytest.mark.parametrize("budget", [0.25, 0.35, 0.5, 1.0])
@pytest.mark.parametrize("num_visual", [97, 1000, 25_600])
def test_depth_average_hits_the_budget(pattern, schedule, budget, num_visual) -> None:
    config = parse({"budget": budget, "schedule": schedule, "min_keep": 1})
    s = build_schedule(pattern, config)
    counts = s.keep_counts(num_visual, config.min_keep)
    assert counts[0] == num_visual
    assert all(b <= a for a, b in pairwise(counts))  # tokens never come back
    # rounding each stage moves the depth average by at most half a token per block
    assert abs(s.depth_average(counts, len(pattern)) - budget * num_visual) <= 0.5 + 1e-9
    assert len(stage_sizes(len(pattern), s.boundaries)) == len(counts)


def test_progressive_low_to_high() -> None:
    s = build_schedule(NANO, parse({"budget": 0.25}))
    assert s.boundaries == [i for i, k in enumerate(NANO) if k == "*"]
    assert s.ratios[1] > s.ratios[-1] and s.ratios[1] > 0.25 > s.ratios[-1]


def test_final_ratio_and_explicit_modes() -> None:
    s = build_schedule(SMALL, parse({"budget": 0.25, "budget_mode": "final_ratio"}))
    assert s.keep_counts(1000, 1)[-1] == 250
    s = build_schedule(SMALL, parse({"schedule": [0.8, 0.5, 0.2], "boundaries": [1, 6, 11]}))
    assert s.keep_counts(1000, 1) == [1000, 800, 500, 200]


def test_min_keep_floor() -> None:
    s = build_schedule(SMALL, parse({"budget": 0.25}))
    assert min(s.keep_counts(40, 16)) == 16 and s.keep_counts(10, 16) == [10] * 4


@pytest.mark.parametrize(
    "raw,field",
    [
        ({"budget": 0.0}, "budget"),
        ({"budget": 1.01}, "budget"),
        ({"budget": "high"}, "budget"),
        ({"schedule": "cosine"}, "schedule"),
        ({"schedule": [0.5, 0.9]}, "schedule"),
        ({"boundaries": [5, 2]}, "boundaries"),
        ({"score_layers": "mlp"}, "score_layers"),
        ({"min_keep": 0}, "min_keep"),
        ({"budgt": 0.3}, "budgt"),
    ],
)
def test_invalid_config_names_the_field(raw, field) -> None:
    with pytest.raises(ValueError, match=field):
        from_additional_config({"stateful_reduce": raw})


def test_unreachable_budget_names_budget() -> None:
    with pytest.raises(ValueError, match="budget"):
        build_schedule("M-M-M-M-M*-M", parse({"budget": 0.25}))
