"""Budget -> how many visual tokens each stage keeps (deterministic, never increasing).

Blocks 0..n-1; a reduction happens after each boundary block b_1 < ... < b_S, so
stage 0 (blocks 0..b_1) sees all N visual tokens and stage j sees k_j <= k_{j-1}.
In depth-average mode the schedule satisfies  sum_j n_j k_j / n = budget * N  up to
rounding (half a token per block), n_j being the number of blocks in stage j.
"""

import math
from dataclasses import dataclass
from itertools import pairwise

from .config import ReductionConfig

SCORING_KINDS = {"M": "mamba", "*": "attention"}


def boundary_blocks(pattern: str, config: ReductionConfig) -> list[int]:
    """Block indices after which tokens are dropped (never after the last block)."""
    if config.boundaries == "attention":
        blocks = [i for i, kind in enumerate(pattern) if kind == "*"]
    else:
        blocks = list(config.boundaries)
    blocks = [b for b in blocks if b < len(pattern) - 1]
    if not blocks:
        raise ValueError(f"boundaries: no reduction boundary before the last block of pattern {pattern!r}")
    return blocks


def stage_of(block: int, boundaries: list[int]) -> int:
    """The stage block `block` runs in: how many boundaries come before it."""
    return sum(boundary < block for boundary in boundaries)


def stage_sizes(num_blocks: int, boundaries: list[int]) -> list[int]:
    """Blocks per stage: stage 0 ends at boundaries[0] (inclusive), the last at n-1."""
    edges = [-1, *boundaries, num_blocks - 1]
    return [b - a for a, b in pairwise(edges)]


@dataclass(frozen=True)
class Schedule:
    boundaries: list[int]
    ratios: list[float]  # keep ratio per stage; ratios[0] == 1

    def keep_counts(self, num_visual: int, min_keep: int) -> list[int]:
        """Visual tokens kept in each stage, monotone, at least min(min_keep, N)."""
        floor = min(min_keep, num_visual)
        counts, prev = [], num_visual
        for r in self.ratios:
            prev = min(prev, max(floor, round(r * num_visual)))
            counts.append(prev)
        return counts

    def depth_average(self, counts: list[int], num_blocks: int) -> float:
        sizes = stage_sizes(num_blocks, self.boundaries)
        return sum(n * k for n, k in zip(sizes, counts, strict=True)) / num_blocks


class Schedules:
    """One block pattern's schedules by config, each built once (a schedule is a
    bisection): what the worker plans steps with and the scheduler predicts drops with."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self._built: dict[str, Schedule] = {}

    def __call__(self, config: ReductionConfig) -> Schedule:
        key = config.model_dump_json()
        if key not in self._built:
            self._built[key] = build_schedule(self.pattern, config)
        return self._built[key]


def _sigmoid_ratios(sizes: list[int], l0: float, floor: float, temperature: float) -> list[float]:
    n = sum(sizes)
    ratios, start = [1.0], sizes[0]
    for size in sizes[1:]:
        blocks = range(start, start + size)
        r = [floor + (1 - floor) / (1 + math.exp(-(l0 - block) / (temperature * n))) for block in blocks]
        ratios.append(sum(r) / size)
        start += size
    return ratios


def _depth_mean(sizes: list[int], ratios: list[float]) -> float:
    return sum(n * r for n, r in zip(sizes, ratios, strict=True)) / sum(sizes)


def build_schedule(pattern: str, config: ReductionConfig) -> Schedule:
    """Stage keep ratios for a block pattern. Raises ValueError (naming `budget`)
    when the budget cannot be reached with these boundaries."""
    boundaries = boundary_blocks(pattern, config)
    sizes = stage_sizes(len(pattern), boundaries)
    stages = len(sizes) - 1
    budget = config.budget
    if isinstance(config.schedule, list):
        if len(config.schedule) != stages:
            raise ValueError(f"schedule: {len(config.schedule)} ratios for {stages} boundaries {boundaries}")
        return Schedule(boundaries, [1.0, *config.schedule])
    if config.budget_mode == "final_ratio":
        if config.schedule == "step":
            return Schedule(boundaries, [1.0] + [budget] * stages)
        return Schedule(boundaries, _geometric(budget ** (1 / stages), stages))
    smallest = sizes[0] / len(pattern) + (config.sigmoid_floor if config.schedule == "sigmoid" else 0.0) * (
        1 - sizes[0] / len(pattern)
    )
    if budget < smallest - 1e-9:
        raise ValueError(
            f"budget: {budget} is below the smallest depth average {smallest:.3f} reachable when the first "
            f"reduction is after block {boundaries[0]} of {len(pattern)}; raise the budget or move the boundaries"
        )
    if config.schedule == "step":
        rest = len(pattern) - sizes[0]
        return Schedule(boundaries, [1.0] + [(budget * len(pattern) - sizes[0]) / rest] * stages)
    if config.schedule == "geometric":
        return Schedule(
            boundaries,
            _geometric(_bisect(lambda lam: _depth_mean(sizes, _geometric(lam, stages)), budget, 0.0, 1.0), stages),
        )

    # sigmoid: the depth mean grows with l0
    def ratios(l0: float) -> list[float]:
        return _sigmoid_ratios(sizes, l0, config.sigmoid_floor, config.sigmoid_temperature)

    n = len(pattern)
    return Schedule(boundaries, ratios(_bisect(lambda l0: _depth_mean(sizes, ratios(l0)), budget, -10.0 * n, 10.0 * n)))


def _geometric(lam: float, stages: int) -> list[float]:
    return [lam**j for j in range(stages + 1)]


def _bisect(f, target: float, lo: float, hi: float) -> float:
    """x in [lo, hi] with f(x) = target, f increasing."""
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2
