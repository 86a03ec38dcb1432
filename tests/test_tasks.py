"""The procedural video QA family: deterministic, answerable only from the video."""

import numpy as np
import pytest

from vllm_stateful_reduce.testing.tasks import (
    COLOURS,
    KINDS,
    SHAPES,
    TEST_SEEDS,
    TRAIN_SEEDS,
    chance_accuracy,
    make_example,
)

AREA = {int(mask.sum()): shape for shape, mask in SHAPES.items()}  # 256 / 208 / 128 pixels


def objects(frames: np.ndarray) -> list[tuple[str, str] | None]:
    """(colour, shape) per frame, read back from the pixels (exact RGB fill and its area)."""
    out = []
    for frame in frames:
        found = [(c, AREA[n]) for c, rgb in COLOURS.items() if (n := int((frame == rgb).all(-1).sum()))]
        assert len(found) <= 1
        out.append(found[0] if found else None)
    return out


def test_seeded_and_splits_disjoint() -> None:
    a, b = make_example(123), make_example(123)
    assert np.array_equal(a.frames, b.frames) and a.question == b.question and a.answer == b.answer
    assert TRAIN_SEEDS.stop <= TEST_SEEDS.start


@pytest.mark.parametrize("kind", KINDS)
def test_answers_follow_from_the_frames(kind: str) -> None:
    for seed in range(40):
        e = make_example(seed, kind=kind)
        assert e.answer in e.choices and e.frames.shape == (8, 64, 64, 3)
        seen = [o for o in objects(e.frames) if o is not None]
        if kind == "count":
            assert sum(c == "blue" for c, _ in seen) == int(e.answer)
        elif kind == "colour_of":
            assert [c for c, s in seen if s == "circle"] == [e.answer]
        elif kind == "shape_of":
            assert [s for c, s in seen if c == "red"] == [e.answer]
        else:
            assert [c for c, _ in seen if c in ("red", "green")][0] == e.answer
            assert sorted(c for c, _ in seen if c in ("red", "green")) == ["green", "red"]


def test_chance_accuracy() -> None:
    examples = [make_example(s) for s in range(400)]
    assert abs(chance_accuracy(examples) - np.mean([1 / 5, 1 / 4, 1 / 3, 1 / 2])) < 1e-9


@pytest.mark.parametrize("kind", KINDS)
def test_targets_are_the_tokens_of_the_named_objects(kind: str) -> None:
    for seed in range(40):
        e = make_example(seed, kind=kind)
        assert len(e.targets) == (int(e.answer) if kind == "count" else 2 if kind == "order" else 1)
        for token in e.targets:
            frame, quadrant = divmod(token, 4)
            y, x = divmod(quadrant, 2)
            cell = e.frames[frame, 32 * y : 32 * y + 32, 32 * x : 32 * x + 32]
            colour = objects(e.frames)[frame][0]
            assert (cell == COLOURS[colour]).all(-1).sum() == (e.frames[frame] == COLOURS[colour]).all(-1).sum() > 0
