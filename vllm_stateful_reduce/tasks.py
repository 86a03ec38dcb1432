"""A procedural video QA family whose questions need the whole video.

Each video is a row of small frames; a frame is grey or holds one coloured square in
one quadrant (one visual token per quadrant at 64 px). The question comes after the
video, so a query-conditioned reduction must find the frames that matter:

- which_frame: "In which frame is the red square?"      -> "3"   (exactly one red)
- count:       "How many frames show a blue square?"     -> "2"
- colour_at:   "What colour is the square in frame 5?"   -> "green"
- order:       "Which comes first, red or green?"        -> "red"

Everything follows from an integer seed; train and test use disjoint seed ranges.
Answers are one word, scored by exact match.
"""

from dataclasses import dataclass

import numpy as np

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (40, 60, 230), "yellow": (230, 210, 30)}
KINDS = ("which_frame", "count", "colour_at", "order")
TRAIN_SEEDS = range(0, 10_000_000)
TEST_SEEDS = range(10_000_000, 20_000_000)


@dataclass(frozen=True)
class Example:
    seed: int
    kind: str
    frames: np.ndarray  # (T, H, W, 3) uint8
    question: str
    answer: str
    choices: tuple[str, ...]  # every possible answer of this kind (for chance accuracy)


def _draw(num_frames: int, size: int, colours: list[str | None], rng: np.random.Generator) -> np.ndarray:
    frames = np.full((num_frames, size, size, 3), 110, np.uint8)
    frames += rng.integers(0, 12, frames.shape, dtype=np.uint8)  # texture, never constant
    half, side = size // 2, size // 4
    for t, colour in enumerate(colours):
        if colour is None:
            continue
        qy, qx = rng.integers(0, 2, 2) * half
        y, x = qy + rng.integers(0, half - side + 1), qx + rng.integers(0, half - side + 1)
        frames[t, y : y + side, x : x + side] = COLOURS[colour]
    return frames


def make_example(seed: int, num_frames: int = 8, size: int = 64, kind: str | None = None) -> Example:
    rng = np.random.default_rng(seed)
    kind = kind or KINDS[seed % len(KINDS)]
    others = [c for c in COLOURS if c != "red"]
    colours: list[str | None]
    if kind == "which_frame":
        target = int(rng.integers(num_frames))
        colours = [None if rng.random() < 0.4 else str(rng.choice(others)) for _ in range(num_frames)]
        colours[target] = "red"
        question, answer = "In which frame is the red square?", str(target + 1)
        choices = tuple(str(i + 1) for i in range(num_frames))
    elif kind == "count":
        n = int(rng.integers(0, 5))
        picks = set(rng.choice(num_frames, n, replace=False).tolist())
        not_blue = [c for c in COLOURS if c != "blue"]
        colours = [
            "blue" if t in picks else (None if rng.random() < 0.5 else str(rng.choice(not_blue))) for t in range(num_frames)
        ]
        question, answer = "How many frames show a blue square?", str(n)
        choices = tuple(str(i) for i in range(5))
    elif kind == "colour_at":
        colours = [str(rng.choice(list(COLOURS))) for _ in range(num_frames)]
        k = int(rng.integers(num_frames))
        question, answer = f"What colour is the square in frame {k + 1}?", colours[k]
        choices = tuple(COLOURS)
    elif kind == "order":
        first, second = rng.permutation(num_frames)[:2]
        pair = ["red", "green"] if rng.random() < 0.5 else ["green", "red"]
        colours = [None] * num_frames
        colours[first], colours[second] = pair
        question = "Which comes first, red or green?"
        answer = pair[0] if first < second else pair[1]
        choices = ("red", "green")
    else:
        raise ValueError(f"unknown task kind {kind!r}; one of {KINDS}")
    return Example(seed, kind, _draw(num_frames, size, colours, rng), question, answer, choices)


def chance_accuracy(examples: list[Example]) -> float:
    return float(np.mean([1.0 / len(e.choices) for e in examples]))
