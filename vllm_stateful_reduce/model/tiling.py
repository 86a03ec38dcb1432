"""Image tiling of Nano VL v2 (InternVL's dynamic tiling), without torchvision.

An image is resized to the grid of `size` px tiles whose aspect ratio is closest to
its own (at most `max_num_tiles` tiles, default 12) and cut into those tiles, row by
row; with more than one tile a thumbnail of the whole image (one tile) follows. Each
tile becomes `tokens_per_tile` visual tokens (256 for 512 px tiles).

The rule and the resampling are those of vLLM 0.32's in-tree processor
(`transformers_utils/processors/internvl.py`: `get_internvl_target_ratios`,
`find_closest_aspect_ratio`, `calculate_internvl_targets`; `nano_nemotron_vl.py`:
`dynamic_preprocess`, bicubic with antialiasing on float32 values, then normalised),
which cannot be imported beside a CPU torch (it imports torchvision).
"""

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

DEFAULT_MAX_NUM_TILES = 12  # vLLM's DEFAULT_NUM_TILES for this model


def target_ratios(max_num_tiles: int) -> list[tuple[int, int]]:
    """Every (columns, rows) grid of 1..max_num_tiles tiles, fewest tiles first. Built as
    vLLM builds it, so that equal tile counts come in the same (set) order."""
    ratios = {
        (i, j)
        for n in range(1, max_num_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if 1 <= i * j <= max_num_tiles
    }
    return sorted(ratios, key=lambda r: r[0] * r[1])


def tile_grid(width: int, height: int, size: int, max_num_tiles: int) -> tuple[int, int]:
    """(columns, rows) of the grid an image is resized to: the closest aspect ratio; on a
    tie the later (larger) grid when the image has more than half its pixels."""
    if max_num_tiles < 1:
        raise ValueError(f"max_num_tiles must be at least 1, got {max_num_tiles}")
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in target_ratios(max_num_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * size * size * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(width: int, height: int, size: int, max_num_tiles: int, use_thumbnail: bool) -> int:
    """Tiles of one image, the thumbnail included."""
    cols, rows = tile_grid(width, height, size, max_num_tiles)
    return cols * rows + (1 if use_thumbnail and cols * rows > 1 else 0)


def image_tiles(
    image: Image.Image,
    size: int,
    max_num_tiles: int,
    use_thumbnail: bool,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(tiles, 3, size, size) normalised pixel values of one image, thumbnail last."""
    width, height = image.size
    cols, rows = tile_grid(width, height, size, max_num_tiles)
    pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))[None]  # (1, H, W, 3)
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    grid = _resized(pixels, (rows * size, cols * size), mean_t, std_t, dtype)  # (1, 3, rows*S, cols*S)
    tiles = grid.reshape(3, rows, size, cols, size).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, size, size)
    if use_thumbnail and rows * cols > 1:
        tiles = torch.cat([tiles, _resized(pixels, (size, size), mean_t, std_t, dtype)])
    return tiles


def _resized(
    pixels: torch.Tensor, hw: tuple[int, int], mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """(1, H, W, 3) uint8 -> (1, 3, h, w): bicubic with antialiasing on float32, normalised."""
    x = pixels.permute(0, 3, 1, 2).to(torch.float32)
    x = torch.nn.functional.interpolate(x, size=hw, mode="bicubic", align_corners=False, antialias=True)
    return ((x / 255.0 - mean) / std).to(dtype).contiguous()
