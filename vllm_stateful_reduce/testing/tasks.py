"""A procedural video QA family whose questions need the whole video.

Each video is a row of small frames; a frame is grey or holds one coloured shape in
one quadrant (one visual token per quadrant at 64 px). The question comes after the
video and names what to look for, so a query-conditioned reduction must find the
few frames that matter among distractors:

- count:     "How many blue shapes are there?"       -> "2"
- colour_of: "What colour is the circle?"            -> "green"     (exactly one circle)
- shape_of:  "What shape is the red one?"            -> "triangle"  (exactly one red)
- order:     "Which comes first, red or green?"      -> "red"

Everything follows from an integer seed; train and test use disjoint seed ranges.
Answers are one word, scored by exact match.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (40, 60, 230), "yellow": (230, 210, 30)}
SIDE = 16  # shape size in pixels at 64 px frames (the default model's ViT patch)


def _masks(side: int) -> dict[str, np.ndarray]:
    y, x = np.mgrid[:side, :side] + 0.5
    return {
        "square": np.ones((side, side), bool),
        "circle": (y - side / 2) ** 2 + (x - side / 2) ** 2 <= (side / 2) ** 2,
        "triangle": np.abs(x - side / 2) <= y / 2,  # apex up
    }


SHAPES = _masks(SIDE)
KINDS = ("count", "colour_of", "shape_of", "order")
TRAIN_SEEDS = range(0, 10_000_000)
TEST_SEEDS = range(10_000_000, 20_000_000)

Object = tuple[str, str] | None  # (colour, shape) or an empty frame


@dataclass(frozen=True)
class Example:
    seed: int
    kind: str
    frames: np.ndarray  # (T, H, W, 3) uint8
    question: str
    answer: str
    choices: tuple[str, ...]  # every possible answer of this kind (for chance accuracy)
    targets: tuple[int, ...]  # visual tokens (frame * 4 + quadrant) of the objects the question names


def _draw(objects: list[Object], size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int | None]]:
    """Frames, and per frame the quadrant (row-major 2x2) its object lies in: one visual
    token of the default model (64 px, 16 px patches, pixel shuffle 0.5)."""
    frames = np.full((len(objects), size, size, 3), 110, np.uint8)
    frames += rng.integers(0, 12, frames.shape, dtype=np.uint8)  # texture, never constant
    quadrants: list[int | None] = [None] * len(objects)
    for t, obj in enumerate(objects):
        if obj is None:
            continue
        y, x = rng.integers(0, size // SIDE, 2) * SIDE  # on the 16 px grid (one ViT patch)
        frames[t, y : y + SIDE, x : x + SIDE][SHAPES[obj[1]]] = COLOURS[obj[0]]
        quadrants[t] = int(y >= size // 2) * 2 + int(x >= size // 2)
    return frames, quadrants


def _fill(
    num_frames: int,
    fixed: Mapping[int, Object],
    allowed: list[tuple[str, str]],
    clutter: float,
    rng: np.random.Generator,
) -> list[Object]:
    """`fixed` frames as given; every other frame holds a random allowed object with
    probability `clutter`, else nothing."""
    pick = lambda: allowed[int(rng.integers(len(allowed)))]  # noqa: E731
    return [fixed[t] if t in fixed else (pick() if rng.random() < clutter else None) for t in range(num_frames)]


def make_example(
    seed: int, num_frames: int = 8, size: int = 64, kind: str | None = None, clutter: float = 0.6
) -> Example:
    """`clutter`: chance that a frame not needed for the answer holds a distractor
    (training also draws easier, less cluttered videos)."""
    rng = np.random.default_rng(seed)
    kind = kind or KINDS[seed % len(KINDS)]
    every = [(c, s) for c in COLOURS for s in SHAPES]
    if kind == "count":
        n = int(rng.integers(0, 5))
        picks = rng.choice(num_frames, n, replace=False).tolist()
        fixed = {t: ("blue", str(rng.choice(list(SHAPES)))) for t in picks}
        objects = _fill(num_frames, fixed, [o for o in every if o[0] != "blue"], clutter, rng)
        question, answer, choices = "How many blue shapes are there?", str(n), tuple(str(i) for i in range(5))
    elif kind == "colour_of":
        colour = str(rng.choice(list(COLOURS)))
        fixed = {int(rng.integers(num_frames)): (colour, "circle")}
        objects = _fill(num_frames, fixed, [o for o in every if o[1] != "circle"], clutter, rng)
        question, answer, choices = "What colour is the circle?", colour, tuple(COLOURS)
    elif kind == "shape_of":
        shape = str(rng.choice(list(SHAPES)))
        fixed = {int(rng.integers(num_frames)): ("red", shape)}
        objects = _fill(num_frames, fixed, [o for o in every if o[0] != "red"], clutter, rng)
        question, answer, choices = "What shape is the red one?", shape, tuple(SHAPES)
    elif kind == "order":
        first, second = rng.permutation(num_frames)[:2].tolist()
        pair = ["red", "green"] if rng.random() < 0.5 else ["green", "red"]
        fixed = {first: (pair[0], str(rng.choice(list(SHAPES)))), second: (pair[1], str(rng.choice(list(SHAPES))))}
        objects = _fill(num_frames, fixed, [o for o in every if o[0] not in pair], clutter, rng)
        question, answer, choices = (
            "Which comes first, red or green?",
            pair[0] if first < second else pair[1],
            ("red", "green"),
        )
    else:
        raise ValueError(f"unknown task kind {kind!r}; one of {KINDS}")
    frames, quadrants = _draw(objects, size, rng)
    targets = tuple(sorted(t * 4 + quadrants[t] for t in fixed))
    return Example(seed, kind, frames, question, answer, choices, targets)


def chance_accuracy(examples: list[Example]) -> float:
    return float(np.mean([1.0 / len(e.choices) for e in examples]))
