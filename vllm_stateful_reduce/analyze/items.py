"""The questions an analysis runs on, tokenised as vLLM's processor lays them out.

From the procedural task family, every item knows its answer, its target tokens and the
colour of every object token; from a JSONL file (`{"video": path, "question": str,
"answer": str?, "targets": [int]?}` per line) only what the file gives.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..testing.encoding import Encoder
from ..testing.tasks import COLOURS, TEST_SEEDS, Example, make_example
from ..testing.video_files import read_video


@dataclass(frozen=True)
class Item:
    prompt: list[int]  # prompt token ids, video expanded
    answer: list[int]  # answer token ids (empty: not known)
    pixels: torch.Tensor  # (frames, 3, S, S)
    targets: tuple[int, ...]  # visual-token indices the question is about (empty: not known)
    colours: tuple[int, ...]  # per visual token: index into COLOURS of the object it holds, -1 none (empty: not known)
    kind: str


def token_colours(frames: np.ndarray, tokens_per_frame: int) -> tuple[int, ...]:
    """Per visual token, the task colour whose exact RGB fills part of its cell (-1: none).
    A token covers a square cell of the frame (patches, then pixel shuffle), row-major."""
    side = frames.shape[1]
    cells = int(round(tokens_per_frame**0.5))
    step = side // cells
    palette = np.array(list(COLOURS.values()), dtype=np.uint8)  # (C, 3)
    # (T, cells, step, cells, step, 3) -> per cell and colour: any pixel of exactly that colour
    grid = frames.reshape(len(frames), cells, step, cells, step, 3).transpose(0, 1, 3, 2, 4, 5)
    hits = (grid[..., None, :] == palette).all(-1).any(axis=(3, 4))  # (T, cells, cells, C)
    found = np.where(hits.any(-1), hits.argmax(-1), -1)
    return tuple(int(c) for c in found.reshape(-1))


def _item(enc: Encoder, example: Example, tokens_per_frame: int, known: bool, order: str = "video_first") -> Item:
    return Item(
        prompt=enc.prompt_ids(example, order),
        answer=enc.answer_ids(example) if example.answer else [],
        pixels=enc.pixels(example),
        targets=example.targets,
        colours=token_colours(example.frames, tokens_per_frame) if known else (),
        kind=example.kind,
    )


def task_items(enc: Encoder, count: int, order: str = "video_first", **task: object) -> list[Item]:
    """Held-out examples of the task family (`task`: `make_example`'s options)."""
    return example_items(enc, [make_example(seed, **task) for seed in TEST_SEEDS[:count]], order)  # type: ignore[arg-type]


def example_items(enc: Encoder, examples: list[Example], order: str = "video_first") -> list[Item]:
    """Task examples as items, the question after the video or before it (`order`,
    `tokenizer.ORDERS`)."""
    per_frame = enc.config.tokens_per_frame
    return [_item(enc, e, per_frame, known=True, order=order) for e in examples]


def file_items(enc: Encoder, path: Path) -> list[Item]:
    """Questions from a JSONL file; video paths are relative to the file."""
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"video", "question"} - set(row)
        if missing:
            raise ValueError(f"{path}:{number}: missing field(s) {sorted(missing)}")
        frames = read_video(path.parent / row["video"])
        example = Example(-1, "file", frames, row["question"], row.get("answer", ""), (), tuple(row.get("targets", ())))
        items.append(_item(enc, example, enc.config.tokens_per_frame, known=False))
    return items
