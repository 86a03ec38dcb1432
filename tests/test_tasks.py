"""The procedural video QA family: deterministic, answerable only from the video."""

import numpy as np
import pytest

from vllm_stateful_reduce.testing.tasks import (
    CELL,
    COLOURS,
    KINDS,
    LONG_KINDS,
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
        assert_targets_hold_objects(e.frames, e.targets)


def assert_targets_hold_objects(frames: np.ndarray, targets: tuple[int, ...]) -> None:
    """Each target token's CELL x CELL cell (row-major) holds all of its frame's object."""
    cells = frames.shape[1] // CELL
    for token in targets:
        frame, at = divmod(token, cells * cells)
        y, x = divmod(at, cells)
        cell = frames[frame, CELL * y : CELL * y + CELL, CELL * x : CELL * x + CELL]
        colour = objects(frames)[frame][0]
        assert (cell == COLOURS[colour]).all(-1).sum() == (frames[frame] == COLOURS[colour]).all(-1).sum() > 0


def test_long_family_shape_kinds_and_prompt_share() -> None:
    """64 frames of 128 px: 16 visual tokens a frame, 1,024 a video; seeds cycle the long kinds."""
    examples = [make_example(TEST_SEEDS[i], family="long") for i in range(8)]
    assert [e.kind for e in examples] == list(LONG_KINDS) * 2
    assert all(e.frames.shape == (64, 128, 128, 3) for e in examples)
    # most frames hold a distractor
    assert np.mean([o is not None for e in examples for o in objects(e.frames)]) > 0.5
    with pytest.raises(ValueError, match="family"):
        make_example(0, family="medium")


@pytest.mark.parametrize("kind", LONG_KINDS)
def test_long_answers_and_targets_follow_from_the_frames(kind: str) -> None:
    """after: the next non-empty frame after the only circle; second: the second of
    2-4 squares of different colours. Targets: the answer's object's token."""
    for seed in range(30):
        e = make_example(seed, kind=kind, family="long")
        seen = objects(e.frames)
        present = [(t, o) for t, o in enumerate(seen) if o is not None]
        if kind == "colour_of":
            answer_frames = [t for t, (c, s) in present if s == "circle"]
            assert [seen[t][0] for t in answer_frames] == [e.answer]
        elif kind == "shape_of":
            answer_frames = [t for t, (c, s) in present if c == "red"]
            assert [seen[t][1] for t in answer_frames] == [e.answer]
        elif kind == "after":
            (circle,) = [t for t, (c, s) in present if s == "circle"]
            answer_frames = [next(t for t, _ in present if t > circle)]
            assert seen[answer_frames[0]][0] == e.answer != seen[circle][0]
        else:
            squares = [(t, c) for t, (c, s) in present if s == "square"]
            assert 2 <= len(squares) <= 4 and len({c for _, c in squares}) == len(squares)
            answer_frames = [squares[1][0]]
            assert squares[1][1] == e.answer
        assert e.answer in e.choices
        assert [t // 16 for t in e.targets] == answer_frames
        assert_targets_hold_objects(e.frames, e.targets)
