"""The video processor without an engine: pixels against PIL, token layout, errors."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from vllm_stateful_reduce.model.hf_config import NemotronNanoVLConfig
from vllm_stateful_reduce.model.processing import (
    NanoVLVideoPreprocessor,
    frames_to_pixel_values,
)

from .helpers import chat_prompt, random_video, video_metadata

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def pil_reference(frames: np.ndarray, size: int) -> np.ndarray:
    """Straightforward per-channel PIL bicubic resize (float mode) + normalisation."""
    out = np.stack(
        [
            np.stack(
                [
                    np.asarray(
                        Image.fromarray(frame[..., c].astype(np.float32), mode="F").resize(
                            (size, size), Image.Resampling.BICUBIC
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
def processor(checkpoint) -> NanoVLVideoPreprocessor:
    return NanoVLVideoPreprocessor(
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
    processor = NanoVLVideoPreprocessor(
        NemotronNanoVLConfig.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint), torch.bfloat16
    )
    size, c = processor.image_size, processor.config
    videos = [random_video(2, size, size, seed=1), random_video(3, size + 5, size - 3, seed=2)]
    out = processor([(v, video_metadata(len(v))) for v in videos])["pixel_values_flat_video"]
    expected = torch.cat([frames_to_pixel_values(v, size, c.norm_mean, c.norm_std).to(torch.bfloat16) for v in videos])
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)


@pytest.mark.parametrize("num_frames", [1, 3, 8])
def test_placeholders_equal_visual_embeddings(processor, reference, num_frames: int) -> None:
    meta = video_metadata(num_frames, fps=4.0)
    repl = processor.video_replacement(num_frames, meta["frames_indices"], 250)
    ids = torch.tensor(repl.full)
    is_embed = repl.is_embed(repl.full)
    pixels = processor([(random_video(num_frames), meta)])["pixel_values_flat_video"]
    visual = reference.vision_embeddings(pixels)
    # one visual embedding per <image> slot, nothing else
    assert int(is_embed.sum()) == visual.shape[0] * visual.shape[1] == num_frames * processor.tokens_per_frame
    assert torch.equal(is_embed, ids == processor.img_context_id)
    text = processor.tokenizer.decode(ids[~is_embed])
    expected = "\n".join(f"Frame {i + 1} sampled at {i * 0.25:.2f} seconds: <img></img>" for i in range(num_frames))
    assert text == expected


def test_pixel_values_and_metadata(processor: NanoVLVideoPreprocessor) -> None:
    videos = [(random_video(n, seed=n), video_metadata(n)) for n in (2, 5)]
    out = processor(videos)
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
        processor([(frames, meta)])


def test_chat_template_places_video_placeholder(processor: NanoVLVideoPreprocessor) -> None:
    parts = [{"type": "video_url", "video_url": {"url": "x"}}, {"type": "text", "text": "What?"}]
    for content in (parts, "<video>\nWhat?"):
        rendered = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        assert rendered == chat_prompt("What?")


def test_per_request_options_survive_the_model_dtype() -> None:
    """vLLM casts floating-point multimodal fields to the model's dtype: options travel
    as integers, so a budget of 0.35 stays 0.35 in a bf16 engine (it was 0.3496)."""
    from vllm_stateful_reduce.model.processing import decode_options, encode_options

    encoded = encode_options({"budget": 0.35, "evs_rate": 0.3})
    assert not encoded.is_floating_point()
    assert decode_options(encoded) == {"budget": 0.35, "evs_rate": 0.3}
    assert decode_options(encode_options({"enabled": False})) == {"enabled": False}
    assert decode_options(encode_options(None)) is None
