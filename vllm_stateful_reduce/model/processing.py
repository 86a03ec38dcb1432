"""Video processor for Nemotron Nano VL v2 checkpoints, without torchvision.

Same token layout as vLLM's in-tree `nano_nemotron_vl` processor (which cannot be
imported on a CPU install because it pulls in torchvision): each frame becomes

    "Frame {i} sampled at {t:.2f} seconds: " <img> <image>*tokens_per_frame </img>

with "\n" before every frame but the first. Only the `<image>` context tokens are
embedding positions (`select_token_ids`), so frame text stays text in the prompt
and the model finds visual rows by token id.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import BaseDummyInputsBuilder
from vllm.multimodal.processing.processor import (
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)

from ..config import CONFIG_KEY
from ..media import video_metadata
from ..vllm_compat import check_request_options, dummy_videos, expected_hidden_size
from .hf_config import IMG_CONTEXT, IMG_END, IMG_START, VIDEO_PLACEHOLDER, NemotronNanoVLConfig

# Per-request reduction options travel as a per-video tensor, one value per field of
# OPTION_NAMES (NaN = not set), kept with the request's multimodal features.
OPTIONS_FIELD = "stateful_reduce_options"
OPTION_NAMES = ("enabled", "budget", "evs_rate")


def encode_options(options: object) -> torch.Tensor:
    """Validate `mm_processor_kwargs["stateful_reduce"]` (RequestError, a ValueError,
    names the field). The float64 values travel as their int64 bit patterns: vLLM casts
    floating-point multimodal fields to the model's dtype (bf16 would turn a budget of
    0.35 into 0.3496)."""
    overrides = check_request_options(options) or {}
    values = [float("nan") if overrides.get(k) is None else float(overrides[k]) for k in OPTION_NAMES]
    return torch.tensor(values, dtype=torch.float64).view(torch.int64)


def decode_options(encoded: torch.Tensor) -> dict | None:
    values = encoded.flatten().view(torch.float64).tolist()
    out = {k: v for k, v in zip(OPTION_NAMES, values, strict=True) if v == v}  # drop NaN
    if "enabled" in out:
        out["enabled"] = bool(out["enabled"])
    return out or None


def frames_to_pixel_values(
    frames: np.ndarray,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames -> (T, 3, size, size) normalised, in `dtype` (the model's:
    what vLLM would cast the processor's float32 output to, rounded once), or into `out` (its
    dtype then).

    Bicubic with antialiasing on float values, as vLLM's in-tree processor does. Frames
    already `size` square skip the resize and are normalised by table (below).
    """
    validate_frames(frames)
    if out is None:
        out = torch.empty((frames.shape[0], 3, size, size), dtype=dtype)
    if frames.shape[1:3] == (size, size):
        return _normalised_by_table(frames, mean, std, out)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return out.copy_(_normalised(x, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)))


def _normalised(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The model's input scale: (x / 255 - mean) / std, float32."""
    return (x / 255.0 - mean) / std


def _normalised_by_table(
    frames: np.ndarray, mean: Sequence[float], std: Sequence[float], out: torch.Tensor
) -> torch.Tensor:
    """`_normalised` of uint8 frames by lookup into `out` (T, 3, H, W): each channel's 256
    levels computed once by the same float32 formula and rounded to `out`'s dtype (so bit
    for bit what the formula then a cast give), then read per pixel straight into the
    channels-first layout, with no temporary per plane (`np.take(out=)`: 14 ms for 16
    frames of 512 px into bf16, one thread, where fancy indexing took 23 ms; a float32
    table, a copy into one tensor and vLLM's cast to bf16 took twice that again). Every
    video request's front end pays it."""
    levels = torch.arange(256, dtype=torch.float32)[:, None]  # (256, 1)
    table = _normalised(levels, torch.tensor(mean), torch.tensor(std)).T.to(out.dtype).contiguous()  # (3, 256)
    bits = _int_view(table).numpy()  # numpy has no bf16: look up the bit patterns
    target = _int_view(out).numpy()
    for t in range(frames.shape[0]):  # frame by frame: 1.5x faster than whole channels (cache)
        for c in range(3):
            np.take(bits[c], frames[t, ..., c], out=target[t, c])
    return out


def _int_view(x: torch.Tensor) -> torch.Tensor:
    """The same memory as a signed integer tensor of the same width."""
    return x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def validate_frames(frames: object) -> None:
    """Reject what cannot be a video, with a message that says what was received."""
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"video: expected a (frames, height, width, 3) array, got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"video: expected shape (frames, height, width, 3), got {tuple(frames.shape)}")
    if frames.shape[0] == 0:
        raise ValueError("video: the video has no frames (nothing could be decoded)")
    if frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"video: frames have zero size {tuple(frames.shape[1:3])}")


def frame_duration_ms(metadata: Mapping[str, Any]) -> int:
    """Integer milliseconds per source frame, as the in-tree processor computes it."""
    fps = metadata.get("fps")
    if not fps or fps <= 0:
        raise ValueError(f"video: metadata needs a positive fps, got {fps!r}")
    return int(1000.0 / fps)


def frame_separators(frames_indices: Sequence[int], duration_ms: int) -> list[str]:
    return [
        ("\n" if i > 0 else "") + f"Frame {i + 1} sampled at {int(idx) * duration_ms / 1000.0:.2f} seconds: "
        for i, idx in enumerate(frames_indices)
    ]


class NanoVLVideoPreprocessor:
    """Stands where an HF processor would: frames -> pixel values and frame metadata."""

    def __init__(self, config: NemotronNanoVLConfig, tokenizer: Any, dtype: torch.dtype = torch.float32) -> None:
        self.config = config
        self.dtype = dtype  # of the pixel values: the model's, so vLLM has nothing to cast
        self.tokenizer = tokenizer
        self.image_size = config.force_image_size
        self.tokens_per_frame = config.tokens_per_frame
        self.img_start_ids = tokenizer.encode(IMG_START, add_special_tokens=False)
        self.img_end_ids = tokenizer.encode(IMG_END, add_special_tokens=False)
        self.img_context_ids = tokenizer.encode(IMG_CONTEXT, add_special_tokens=False)
        if len(self.img_context_ids) != 1:
            raise ValueError(f"tokenizer must encode {IMG_CONTEXT!r} as one token")
        self.img_context_id = self.img_context_ids[0]

    def __call__(
        self, videos: Sequence[tuple[np.ndarray, Mapping[str, Any]]], return_tensors: Any = None, **kwargs: Any
    ) -> BatchFeature:
        options = encode_options(kwargs.get(CONFIG_KEY))
        for frames, _meta in videos:
            validate_frames(frames)
        num_frames = [len(frames) for frames, _meta in videos]
        pixel_values = torch.empty((sum(num_frames), 3, self.image_size, self.image_size), dtype=self.dtype)
        c = self.config
        for (frames, _meta), part in zip(videos, pixel_values.split(num_frames), strict=True):
            frames_to_pixel_values(frames, self.image_size, c.norm_mean, c.norm_std, out=part)
        return BatchFeature(
            {
                "pixel_values_flat_video": pixel_values,  # every video's frames, written in place
                "video_num_patches": torch.tensor(num_frames),
                "frames_indices": [
                    torch.as_tensor(video_frames_indices(frames, meta), dtype=torch.int64) for frames, meta in videos
                ],
                "frame_duration_ms": torch.tensor([frame_duration_ms(meta) for _f, meta in videos]),
                OPTIONS_FIELD: options.expand(len(videos), len(OPTION_NAMES)).clone(),
            }
        )

    def video_replacement(
        self, num_frames: int, frames_indices: Sequence[int], duration_ms: int
    ) -> PromptUpdateDetails:
        """Token ids of a whole video; only the context tokens take visual embeddings."""
        seps = frame_separators(frames_indices[:num_frames], duration_ms)
        sep_ids = self.tokenizer(seps, add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        for frame_sep in sep_ids:
            ids += frame_sep + self.img_start_ids + self.img_context_ids * self.tokens_per_frame + self.img_end_ids
        return PromptUpdateDetails.select_token_ids(ids, self.img_context_ids)


def video_frames_indices(frames: np.ndarray, metadata: Mapping[str, Any]) -> list[int]:
    validate_frames(frames)
    indices = list(metadata.get("frames_indices") or range(frames.shape[0]))
    if len(indices) != frames.shape[0]:
        raise ValueError(f"video: metadata lists {len(indices)} frames_indices for {frames.shape[0]} frames")
    return indices


class NanoVLProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> NemotronNanoVLConfig:
        return self.ctx.get_hf_config(NemotronNanoVLConfig)

    def get_hf_processor(self, **kwargs: object) -> NanoVLVideoPreprocessor:
        return NanoVLVideoPreprocessor(self.get_hf_config(), self.get_tokenizer(), self.ctx.model_config.dtype)

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {}

    def get_default_tok_params(self):
        # The chat template writes every special token itself, as for the in-tree model.
        return super().get_default_tok_params().with_kwargs(add_special_tokens=False)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"video": None}

    def get_data_parser(self) -> MultiModalDataParser:
        return MultiModalDataParser(video_needs_metadata=True, expected_hidden_size=expected_hidden_size(self))

    def frame_token_cost(self) -> int:
        """Prompt tokens one frame costs, wrappers included (upper bound over indices)."""
        processor = self.get_hf_processor()
        longest_sep = "\nFrame 99999 sampled at 99999.99 seconds: "
        sep_len = len(processor.tokenizer.encode(longest_sep, add_special_tokens=False))
        return sep_len + len(processor.img_start_ids) + processor.tokens_per_frame + len(processor.img_end_ids)

    def get_num_frames_with_most_features(self, seq_len: int, mm_counts: Mapping[str, int]) -> int:
        per_video = seq_len // max(mm_counts.get("video", 0), 1)
        return max(per_video // self.frame_token_cost(), 1)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        frames = self.get_num_frames_with_most_features(seq_len, mm_counts)
        return {"video": frames * self.get_hf_config().tokens_per_frame}


class NanoVLDummyInputsBuilder(BaseDummyInputsBuilder[NanoVLProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return VIDEO_PLACEHOLDER * mm_counts.get("video", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Any = None) -> dict:
        size = self.info.get_hf_config().force_image_size
        num_frames = self.info.get_num_frames_with_most_features(seq_len, mm_counts)
        videos = dummy_videos(
            self, width=size, height=size, num_frames=num_frames, num_videos=mm_counts.get("video", 0)
        )
        return {"video": [(video, video_metadata(num_frames)) for video in videos]}


class NanoVLMultiModalProcessor(BaseMultiModalProcessor[NanoVLProcessingInfo]):
    def apply(self, inputs, timing_ctx):
        # Check the reduction options first: whatever the preprocessor's __call__ raises,
        # vLLM re-raises with the decoded media in the message (see vllm_compat).
        merged = self.info.ctx.get_merged_mm_kwargs(inputs.hf_processor_mm_kwargs)
        check_request_options(merged.get(CONFIG_KEY))
        return super().apply(inputs, timing_ctx)

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        num_frames = hf_inputs.get("video_num_patches", torch.empty(0))
        return dict(
            pixel_values_flat_video=MultiModalFieldConfig.flat_from_sizes("video", num_frames),
            video_num_patches=MultiModalFieldConfig.batched("video", keep_on_cpu=True),
            frames_indices=MultiModalFieldConfig.batched("video", keep_on_cpu=True),
            frame_duration_ms=MultiModalFieldConfig.batched("video", keep_on_cpu=True),
            **{OPTIONS_FIELD: MultiModalFieldConfig.batched("video", keep_on_cpu=True)},
        )

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        tokenizer = self.info.get_tokenizer()

        def replacement(item_idx: int) -> PromptUpdateDetails:
            frames, metadata = mm_items["video"][item_idx]
            return processor.video_replacement(
                frames.shape[0], video_frames_indices(frames, metadata), frame_duration_ms(metadata)
            )

        return [
            PromptReplacement(
                modality="video",
                target=tokenizer.encode(VIDEO_PLACEHOLDER, add_special_tokens=False),
                replacement=replacement,
            )
        ]
