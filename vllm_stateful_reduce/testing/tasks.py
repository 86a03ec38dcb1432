"""A procedural video QA family whose questions need the whole video.

Each video is a row of small frames; a frame is grey or holds one 16 px coloured shape
on the 16 px grid, inside one 32 px cell: one visual token of a model with 16 px ViT
patches and pixel shuffle 0.5 (4 tokens per 64 px frame, 16 per 128 px frame). The
question names what to look for (a prompt puts it after or before the video:
`tokenizer.ORDERS`), so a query-conditioned
reduction must find the few frames that matter among distractors:

- count:     "How many blue shapes are there?"                   -> "2"
- colour_of: "What colour is the circle?"                        -> "green"     (exactly one circle)
- shape_of:  "What shape is the red one?"                        -> "triangle"  (exactly one red)
- order:     "Which comes first, red or green?"                  -> "red"
- after:     "What colour is the shape right after the circle?"  -> "blue"  (the next non-empty frame)
- second:    "What colour is the second square?"                 -> "red"   (2-4 squares, all colours differ)

`after` and `second` name their answer's object only through another object or a
count, so which token matters cannot be read off the question in shallow layers.

Three presets (`FAMILIES`): "short" (8 frames of 64 px, the first four kinds: 32 visual
tokens), "long" (64 frames of 128 px, colour_of / shape_of / after / second: 1,024
visual tokens, more than the frame text) and "compositional" (the long kinds on 16 frames
of 128 px: 256 visual tokens). Everything follows from an integer seed; train
and test use disjoint seed ranges. Answers are one word, scored by exact match.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (40, 60, 230), "yellow": (230, 210, 30)}
SIDE = 16  # shape size in pixels (the models' ViT patch)
CELL = 2 * SIDE  # pixels per visual token side (pixel shuffle 0.5 merges 2x2 patches)


def _masks(side: int) -> dict[str, np.ndarray]:
    y, x = np.mgrid[:side, :side] + 0.5
    return {
        "square": np.ones((side, side), bool),
        "circle": (y - side / 2) ** 2 + (x - side / 2) ** 2 <= (side / 2) ** 2,
        "triangle": np.abs(x - side / 2) <= y / 2,  # apex up
    }


SHAPES = _masks(SIDE)
KINDS = ("count", "colour_of", "shape_of", "order")  # the short family's
LONG_KINDS = ("colour_of", "shape_of", "after", "second")
TRAIN_SEEDS = range(0, 10_000_000)
TEST_SEEDS = range(10_000_000, 20_000_000)

Object = tuple[str, str] | None  # (colour, shape) or an empty frame


@dataclass(frozen=True)
class Family:
    """A preset: the kinds a seed cycles through and the default video shape."""

    kinds: tuple[str, ...]
    num_frames: int
    size: int


FAMILIES = {
    "short": Family(KINDS, 8, 64),
    "long": Family(LONG_KINDS, 64, 128),
    # the long kinds on 16 frames (256 visual tokens): short enough for a small model to
    # learn the compositional kinds, long enough that 25% keeps only 64 tokens
    "compositional": Family(LONG_KINDS, 16, 128),
}


@dataclass(frozen=True)
class Example:
    seed: int
    kind: str
    frames: np.ndarray  # (T, H, W, 3) uint8
    question: str
    answer: str
    choices: tuple[str, ...]  # every possible answer of this kind (for chance accuracy)
    # visual tokens (frame * cells^2 + cell, cells row-major, cells = size // CELL) holding
    # the objects the answer is read from: every named object for count / colour_of /
    # shape_of / order; the answer's object only for after and second
    targets: tuple[int, ...]


def _draw(objects: list[Object], size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int | None]]:
    """Frames, and per frame the cell (row-major, CELL px) its object lies in: its visual token."""
    if size % CELL:
        raise ValueError(f"size must be a multiple of {CELL} px, got {size}")
    frames = np.full((len(objects), size, size, 3), 110, np.uint8)
    frames += rng.integers(0, 12, frames.shape, dtype=np.uint8)  # texture, never constant
    cells: list[int | None] = [None] * len(objects)
    for t, obj in enumerate(objects):
        if obj is None:
            continue
        y, x = rng.integers(0, size // SIDE, 2) * SIDE  # on the 16 px grid (one ViT patch)
        frames[t, y : y + SIDE, x : x + SIDE][SHAPES[obj[1]]] = COLOURS[obj[0]]
        cells[t] = int(y // CELL) * (size // CELL) + int(x // CELL)
    return frames, cells


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
    seed: int,
    num_frames: int | None = None,
    size: int | None = None,
    kind: str | None = None,
    clutter: float = 0.6,
    family: str = "short",
) -> Example:
    """`family` ("short" or "long") sets the kinds a seed cycles through and the default
    `num_frames` / `size`; any kind can be drawn at any shape. `clutter`: chance that a
    frame not needed for the answer holds a distractor (training also draws easier ones)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; one of {sorted(FAMILIES)}")
    preset = FAMILIES[family]
    num_frames, size = num_frames or preset.num_frames, size or preset.size
    rng = np.random.default_rng(seed)
    kind = kind or preset.kinds[seed % len(preset.kinds)]
    every = [(c, s) for c in COLOURS for s in SHAPES]
    fixed: dict[int, Object]  # frames set for the answer; the rest hold distractors or nothing
    named = None  # frames whose objects the answer is read from, when not every fixed one
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
    elif kind == "after":
        # the circle, 1-3 empty-or-next frames, then the answer's shape in another colour
        t = int(rng.integers(num_frames - 1))
        gap = 1 + int(rng.integers(min(3, num_frames - 1 - t)))
        colours = rng.permutation(list(COLOURS)).tolist()
        shape = str(rng.choice(["square", "triangle"]))
        fixed = {t: (colours[0], "circle"), t + gap: (colours[1], shape)} | {t + k: None for k in range(1, gap)}
        objects = _fill(num_frames, fixed, [o for o in every if o[1] != "circle"], clutter, rng)
        question, answer, choices = "What colour is the shape right after the circle?", colours[1], tuple(COLOURS)
        named = [t + gap]
    elif kind == "second":
        # 2-4 squares of different colours, so no other square's colour is the answer
        n = 2 + int(rng.integers(3))
        at = sorted(rng.choice(num_frames, n, replace=False).tolist())
        colours = rng.permutation(list(COLOURS)).tolist()
        fixed = {f: (c, "square") for f, c in zip(at, colours, strict=False)}
        objects = _fill(num_frames, fixed, [o for o in every if o[1] != "square"], clutter, rng)
        question, answer, choices = "What colour is the second square?", colours[1], tuple(COLOURS)
        named = [at[1]]
    else:
        raise ValueError(f"unknown task kind {kind!r}; one of {KINDS + LONG_KINDS[2:]}")
    frames, cells = _draw(objects, size, rng)
    per_frame = (size // CELL) ** 2
    targets = tuple(sorted(t * per_frame + c for t in (named or fixed) if (c := cells[t]) is not None))
    return Example(seed, kind, frames, question, answer, choices, targets)


def chance_accuracy(examples: list[Example]) -> float:
    return float(np.mean([1.0 / len(e.choices) for e in examples]))
