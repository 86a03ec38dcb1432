"""The procedural video QA family: deterministic, answerable only from the video."""

import numpy as np
import pytest

from vllm_stateful_reduce.tasks import COLOURS, KINDS, TEST_SEEDS, TRAIN_SEEDS, chance_accuracy, make_example


def test_seeded_and_splits_disjoint() -> None:
    a, b = make_example(123), make_example(123)
    assert np.array_equal(a.frames, b.frames) and a.question == b.question and a.answer == b.answer
    assert TRAIN_SEEDS.stop <= TEST_SEEDS.start


@pytest.mark.parametrize("kind", KINDS)
def test_answers_follow_from_the_frames(kind: str) -> None:
    for seed in range(40):
        e = make_example(seed, kind=kind)
        assert e.answer in e.choices and e.frames.shape == (8, 64, 64, 3)
        present = [  # which colours each frame shows (exact RGB fill)
            {c for c, rgb in COLOURS.items() if (frame == rgb).all(-1).sum() >= 16 * 16} for frame in e.frames
        ]
        if kind == "which_frame":
            assert [i + 1 for i, p in enumerate(present) if "red" in p] == [int(e.answer)]
        elif kind == "count":
            assert sum("blue" in p for p in present) == int(e.answer)
        elif kind == "colour_at":
            k = int(e.question.rstrip("?").split()[-1])
            assert present[k - 1] == {e.answer}
        else:
            first = min(i for i, p in enumerate(present) if p & {"red", "green"})
            assert present[first] == {e.answer}


def test_chance_accuracy() -> None:
    examples = [make_example(s) for s in range(400)]
    assert abs(chance_accuracy(examples) - np.mean([1 / 8, 1 / 5, 1 / 4, 1 / 2])) < 1e-9
