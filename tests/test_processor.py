"""The image and video processor without an engine: pixels against PIL, the tiling
rule against a table of grids computed by hand, token layout (EVS too), errors."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from vllm_stateful_reduce.model.hf_config import NemotronNanoVLConfig
from vllm_stateful_reduce.model.processing import (
    NanoVLPreprocessor,
    frames_to_pixel_values,
)
from vllm_stateful_reduce.model.tiling import image_tiles, num_tiles, tile_grid
from vllm_stateful_reduce.testing.tokenizer import ORDERS

from .helpers import chat_prompt, random_video, video_metadata

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def pil_reference(frames: np.ndarray, size: int) -> np.ndarray:
    """Straightforward per-channel PIL bicubic resize (float mode) + normalisation."""
    return pil_reference_hw(frames, size, size)


def pil_reference_hw(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    out = np.stack(
        [
            np.stack(
                [
                    np.asarray(
                        Image.fromarray(frame[..., c].astype(np.float32), mode="F").resize(
                            (width, height), Image.Resampling.BICUBIC
                        )
                    )
                    for c in range(3)
                ]
            )
            for frame in frames
        ]
    )
    return (out / 255.0 - np.reshape(MEAN, (1, 3, 1, 1))) / np.reshape(STD, (1, 3, 1, 1))


@pytest.fixture(scope="module")
def processor(checkpoint) -> NanoVLPreprocessor:
    return NanoVLPreprocessor(
        NemotronNanoVLConfig.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint)
    )


# downscale, upscale, identity, odd aspect; the real 512 px frame size too
@pytest.mark.parametrize("height,width,size", [(80, 96, 64), (40, 48, 64), (64, 64, 64), (33, 65, 32), (517, 300, 512)])
def test_preprocessing_matches_pil_bicubic(height: int, width: int, size: int) -> None:
    frames = random_video(2, height, width, seed=height)
    ours = frames_to_pixel_values(frames, size, MEAN, STD)
    ref = pil_reference(frames, size)
    assert ours.shape == (2, 3, size, size) and ours.dtype == torch.float32
    err = np.abs(ours.numpy() - ref).max()
    # measured: <= 3.3e-6 (float32 rounding of the two bicubic implementations)
    assert err < 2e-5, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_frames_of_the_model_size_are_normalised_exactly(dtype: torch.dtype) -> None:
    """No resize: the table path gives bit for bit what the float32 formula then vLLM's
    cast to the model's dtype give."""
    frames = random_video(3, 48, 48, seed=7)
    assert set(np.unique(frames)) == set(range(256))  # every level is looked up
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    formula = (x / 255.0 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    ours = frames_to_pixel_values(frames, 48, MEAN, STD, dtype)
    assert ours.dtype == dtype and ours.is_contiguous()
    assert torch.equal(ours, formula.to(dtype))


def test_videos_are_written_into_one_tensor_in_the_model_dtype(checkpoint) -> None:
    """Resized and unresized videos side by side, each as `frames_to_pixel_values` makes it."""
    processor = NanoVLPreprocessor(
        NemotronNanoVLConfig.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint), torch.bfloat16
    )
    size, c = processor.image_size, processor.config
    videos = [random_video(2, size, size, seed=1), random_video(3, size + 5, size - 3, seed=2)]
    out = processor(videos=[(v, video_metadata(len(v))) for v in videos])["pixel_values_flat_video"]
    expected = torch.cat([frames_to_pixel_values(v, size, c.norm_mean, c.norm_std).to(torch.bfloat16) for v in videos])
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


@pytest.mark.parametrize("num_frames", [1, 3, 8])
def test_placeholders_equal_visual_embeddings(processor, reference, num_frames: int) -> None:
    meta = video_metadata(num_frames, fps=4.0)
    repl = processor.video_replacement(num_frames, meta["frames_indices"], 250)
    ids = torch.tensor(repl.full)
    is_embed = repl.is_embed(repl.full)
    pixels = processor(videos=[(random_video(num_frames), meta)])["pixel_values_flat_video"]
    visual = reference.vision_embeddings(pixels)
    # one visual embedding per <image> slot, nothing else
    assert int(is_embed.sum()) == visual.shape[0] * visual.shape[1] == num_frames * processor.tokens_per_frame
    assert torch.equal(is_embed, ids == processor.tokens.image_context)
    text = processor.tokenizer.decode(ids[~is_embed])
    expected = "\n".join(f"Frame {i + 1} sampled at {i * 0.25:.2f} seconds: <img></img>" for i in range(num_frames))
    assert text == expected


def test_pixel_values_and_metadata(processor: NanoVLPreprocessor) -> None:
    videos = [(random_video(n, seed=n), video_metadata(n)) for n in (2, 5)]
    out = processor(videos=videos)
    assert out["pixel_values_flat_video"].shape == (7, 3, 64, 64)
    assert out["video_num_patches"].tolist() == [2, 5]
    assert [f.tolist() for f in out["frames_indices"]] == [[0, 1], [0, 1, 2, 3, 4]]
    assert out["frame_duration_ms"].tolist() == [500, 500]


@pytest.mark.parametrize(
    "frames,meta,message",
    [
        (np.zeros((0, 8, 8, 3), np.uint8), video_metadata(0), "no frames"),
        (np.zeros((2, 8, 8), np.uint8), video_metadata(2), "shape"),
        (np.zeros((2, 8, 8, 4), np.uint8), video_metadata(2), "shape"),
        (random_video(2), {"frames_indices": [0, 1]}, "fps"),
        (random_video(2), video_metadata(3), "frames_indices"),
    ],
)
def test_bad_videos_raise_value_error(processor, frames, meta, message) -> None:
    with pytest.raises(ValueError, match=message):
        processor(videos=[(frames, meta)])


@pytest.mark.parametrize("order", ORDERS)
def test_chat_template_places_video_placeholder(processor: NanoVLPreprocessor, order: str) -> None:
    """OpenAI content parts in either order render as `chat_prompt` says (and so as the
    training encoder builds prompts)."""
    text, video = {"type": "text", "text": "What?"}, {"type": "video_url", "video_url": {"url": "x"}}
    parts = [video, text] if order == "video_first" else [text, video]
    string = "<video>\nWhat?" if order == "video_first" else "What?<video>\n"
    for content in (parts, string):
        rendered = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        assert rendered == chat_prompt("What?", order=order)


# (width, height, max_num_tiles) -> (columns, rows) by the InternVL rule, worked out by hand:
# the grid of at most max_num_tiles tiles whose columns/rows is closest to width/height;
# on a tie the larger grid when the image has more than half of its pixels.
TILE_GRIDS = {
    (512, 512, 12): (1, 1),  # square: 1x1 is the first ratio 1.0 (later ones only tie with more pixels)
    (1024, 1024, 12): (2, 2),  # square with 4 tiles' pixels: ties move to 2x2 (> half of 4 tiles), not 3x3
    (1536, 1536, 12): (3, 3),  # 9 tiles' pixels: up to 3x3 (2x2's 4, 3x3's 9 > half)
    (1024, 512, 12): (2, 1),  # 2:1
    (300, 700, 12): (2, 5),  # aspect 0.43: 2/5 = 0.4 is the closest (3/7 has 21 tiles)
    (4000, 500, 12): (8, 1),  # 8:1 exactly
    (4000, 500, 6): (6, 1),  # capped at 6 tiles: the widest grid
    (700, 300, 1): (1, 1),  # one tile: the image squeezed, no thumbnail
    (100, 60, 12): (3, 2),  # aspect 1.67: 3/2 = 1.5 is the closest (5/3 would need 15 tiles)
}


@pytest.mark.parametrize("wh_max,grid", TILE_GRIDS.items(), ids=[f"{w}x{h}-max{m}" for w, h, m in TILE_GRIDS])
def test_tile_grid_follows_the_internvl_rule(wh_max, grid) -> None:
    width, height, most = wh_max
    assert tile_grid(width, height, 512, most) == grid
    cols, rows = grid
    assert num_tiles(width, height, 512, most, use_thumbnail=True) == cols * rows + (cols * rows > 1)


def test_image_tiles_are_the_resized_image_cut_row_by_row() -> None:
    """Tiles, in order, are the crops of one resize to the grid; the thumbnail is the
    whole image resized to one tile (each resize checked against PIL's bicubic)."""
    image = Image.fromarray(random_video(1, 70, 150, seed=3)[0])  # aspect 2.14 -> 2x1 tiles of 64
    tiles = image_tiles(image, 64, 12, True, MEAN, STD)
    assert tiles.shape == (3, 3, 64, 64)
    frame = np.asarray(image)[None]
    whole = pil_reference_hw(frame, 64, 128)
    assert np.abs(tiles[0].numpy() - whole[0, :, :, :64]).max() < 2e-5
    assert np.abs(tiles[1].numpy() - whole[0, :, :, 64:]).max() < 2e-5
    assert np.abs(tiles[2].numpy() - pil_reference(frame, 64)[0]).max() < 2e-5


def test_image_replacement_counts_tiles(processor) -> None:
    repl = processor.image_replacement(3)
    t = processor.tokens
    assert repl.full == [*t.image_start, *[t.image_context] * (3 * processor.tokens_per_frame), *t.image_end]
    assert int(repl.is_embed(repl.full).sum()) == 3 * processor.tokens_per_frame


@pytest.mark.parametrize("frames,rate", [(4, 0.75), (9, 0.5), (1, 0.9)])
def test_evs_prompt_has_vllms_retained_count(processor, frames: int, rate: float) -> None:
    """With EVS the video's prompt holds vLLM's retained count (first frame at least),
    in the first frame's slot; the whole span takes embeddings (the model lays it out)."""
    from vllm.multimodal.video_prune.evs import compute_retained_tokens_count

    meta = video_metadata(frames)
    full = processor.video_replacement(frames, meta["frames_indices"], 500)
    evs = processor.video_replacement(frames, meta["frames_indices"], 500, rate)
    retained = compute_retained_tokens_count(processor.tokens_per_frame, frames, rate)
    context = processor.tokens.image_context
    assert evs.full.count(context) == retained
    assert len(full.full) - len(evs.full) == frames * processor.tokens_per_frame - retained
    assert evs.is_embed is None  # every position of the span takes the model's embeddings


def test_max_num_tiles_is_checked(processor) -> None:
    from vllm_stateful_reduce.model.processing import max_num_tiles

    assert max_num_tiles(None) == 12 and max_num_tiles(3) == 3
    for bad in (0, -1, 2.5, "4", True):
        with pytest.raises(ValueError, match="max_num_tiles must be a positive integer"):
            max_num_tiles(bad)


def test_per_request_options_survive_the_model_dtype() -> None:
    """vLLM casts floating-point multimodal fields to the model's dtype: options travel
    as integers, so a budget of 0.35 stays 0.35 in a bf16 engine (it was 0.3496)."""
    from vllm_stateful_reduce.media_fields import decode_options, encode_options

    encoded = encode_options({"budget": 0.35, "evs_rate": 0.3})
    assert not encoded.is_floating_point()
    assert decode_options(encoded) == {"budget": 0.35, "evs_rate": 0.3}
    assert decode_options(encode_options({"enabled": False})) == {"enabled": False}
    assert decode_options(encode_options({"reduce_question_before_media": True})) == {
        "reduce_question_before_media": True
    }
    assert decode_options(encode_options(None)) is None


def test_a_tokenizer_without_the_media_tokens_is_refused_at_start_up(processor) -> None:
    """The plugin finds visual rows by the tokenizer's `<image>` id: a tokenizer that does
    not know it as one token (here: one splitting text into characters) stops the model's
    construction with a message, never a silent "no video"."""
    from vllm_stateful_reduce.model.tokens import SpecialTokens

    class CharacterTokenizer:
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [ord(c) for c in text]

    real = SpecialTokens.from_tokenizer(processor.tokenizer)
    assert real.image_context == processor.tokenizer.convert_tokens_to_ids("<image>")
    with pytest.raises(ValueError, match="encodes '<image>' as 7 tokens"):
        SpecialTokens.from_tokenizer(CharacterTokenizer())


def test_a_128_frame_video_under_the_recipes_evs_has_in_tree_length(tmp_path) -> None:
    """The recipe: 128 frames of 512 px at --video-pruning-rate 0.75. The prompt holds
    vLLM's retained count (8,192 visual tokens; ~8.7k with the real tokenizer's frame text),
    not 256 per frame (~34.7k): in-tree's length, and ~4x less KV than without EVS. (This
    small tokenizer spells the frame text in more tokens than the real one.)"""
    from vllm.multimodal.video_prune.evs import compute_retained_tokens_count

    from vllm_stateful_reduce.testing.checkpoint import build_recipe_checkpoint

    ckpt = build_recipe_checkpoint(tmp_path)
    processor = NanoVLPreprocessor(NemotronNanoVLConfig.from_pretrained(ckpt), AutoTokenizer.from_pretrained(ckpt))
    indices = list(range(0, 256, 2))  # 2 fps from a 4 fps source
    full = processor.video_replacement(128, indices, 250).full
    evs = processor.video_replacement(128, indices, 250, 0.75).full
    context = processor.tokens.image_context
    assert evs.count(context) == compute_retained_tokens_count(256, 128, 0.75) == 8192
    assert full.count(context) == 128 * 256
    text = len(full) - 128 * 256  # separators and wrappers, the same with and without EVS
    assert len(evs) == 8192 + text
