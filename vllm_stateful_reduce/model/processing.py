"""Image and video processor for Nemotron Nano VL v2 checkpoints, without torchvision.

Same token layout as vLLM's in-tree `nano_nemotron_vl` processor (which cannot be
imported on a CPU install because it pulls in torchvision). An image becomes
`<img> <image>*(tiles * 256) </img>` (tiles: `tiling.py`); each video frame becomes

    "Frame {i} sampled at {t:.2f} seconds: " <img> <image>*tokens_per_frame </img>

with "\n" before every frame but the first. Only the `<image>` context tokens are
embedding positions (`select_token_ids`), so frame text stays text in the prompt
and the model finds visual rows by token id. With EVS (`--video-pruning-rate`, or a
request's `evs_rate`) the video's prompt is shortened to vLLM's retained count and the
model fills in the frame layout after the vision tower (`evs.py`), as in-tree.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import BaseDummyInputsBuilder
from vllm.multimodal.processing.processor import (
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)
from vllm.multimodal.video_prune.evs import compute_retained_tokens_count

from ..adapter.model_parts import dummy_images, dummy_videos, expected_hidden_size
from ..adapter.request_checks import RequestError, check_request_options
from ..config import CONFIG_KEY
from ..media import video_metadata
from ..media_fields import EVS_FIELD, IMAGE_OPTIONS_FIELD, OPTION_NAMES, OPTIONS_FIELD, encode_options, float_bits
from .hf_config import NemotronNanoVLConfig
from .tiling import DEFAULT_MAX_NUM_TILES, image_tiles, num_tiles, target_ratios
from .tokens import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, SpecialTokens


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
    channels-first layout, with no temporary per plane (`np.take(out=)`; fancy indexing,
    or a float32 table then vLLM's cast, cost more). Every video request's front end pays it."""
    levels = torch.arange(256, dtype=torch.float32)[:, None]  # (256, 1)
    table = _normalised(levels, torch.tensor(mean), torch.tensor(std)).T.to(out.dtype).contiguous()  # (3, 256)
    bits = _int_view(table).numpy()  # numpy has no bf16: look up the bit patterns
    target = _int_view(out).numpy()
    for t in range(frames.shape[0]):  # frame by frame: a frame's planes stay in cache
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


def video_token_ids(
    tokenizer: Any,
    tokens: SpecialTokens,
    tokens_per_frame: Sequence[int],
    frames_indices: Sequence[int],
    duration_ms: int,
) -> list[int]:
    """A video's prompt ids: per frame its separator text, `<img>`, that frame's visual
    tokens, `</img>` (vLLM 0.32's `NanoNemotronVLProcessor.get_video_repl`, T = 1)."""
    seps = tokenizer(frame_separators(frames_indices[: len(tokens_per_frame)], duration_ms), add_special_tokens=False)
    ids: list[int] = []
    for frame_sep, count in zip(seps["input_ids"], tokens_per_frame, strict=True):
        ids += [*frame_sep, *tokens.image_start, *[tokens.image_context] * count, *tokens.image_end]
    return ids


def evs_rate_of(options: Mapping[str, Any] | None, video_pruning_rate: float | None) -> float:
    """The EVS rate a video is pruned at: the request's `evs_rate`, else the engine's
    `--video-pruning-rate` (vLLM's own flag), else none."""
    override = (options or {}).get("evs_rate")
    return float(override) if override is not None else float(video_pruning_rate or 0.0)


class NanoVLPreprocessor:
    """Stands where an HF processor would: images -> tiles, videos -> frames, both as
    normalised pixel values in the model's dtype, with what the model needs per item."""

    def __init__(
        self,
        config: NemotronNanoVLConfig,
        tokenizer: Any,
        dtype: torch.dtype = torch.float32,
        video_pruning_rate: float | None = None,
    ) -> None:
        self.config = config
        self.dtype = dtype  # of the pixel values: the model's, so vLLM has nothing to cast
        self.tokenizer = tokenizer
        self.tokens = SpecialTokens.from_tokenizer(tokenizer)
        self.image_size = config.force_image_size
        self.tokens_per_frame = config.tokens_per_frame  # also per image tile
        self.video_pruning_rate = video_pruning_rate

    def __call__(
        self,
        images: Sequence[Image.Image] | None = None,
        videos: Sequence[tuple[np.ndarray, Mapping[str, Any]]] | None = None,
        return_tensors: Any = None,
        **kwargs: Any,
    ) -> BatchFeature:
        options = check_request_options(kwargs.get(CONFIG_KEY))
        encoded = encode_options(options)
        out: dict[str, Any] = {}
        if images:
            out |= self._images(images, max_num_tiles(kwargs.get("max_num_tiles")), encoded)
        if videos:
            out |= self._videos(videos, evs_rate_of(options, self.video_pruning_rate), encoded)
        return BatchFeature(out)

    def _images(self, images: Sequence[Image.Image], tiles_max: int, options: torch.Tensor) -> dict[str, Any]:
        c = self.config
        tiles = [
            image_tiles(im, self.image_size, tiles_max, c.use_thumbnail, c.norm_mean, c.norm_std, self.dtype)
            for im in images
        ]
        return {
            "pixel_values_flat": torch.cat(tiles),
            "image_num_patches": torch.tensor([len(t) for t in tiles]),
            IMAGE_OPTIONS_FIELD: options.expand(len(images), len(OPTION_NAMES)).clone(),
        }

    def _videos(
        self, videos: Sequence[tuple[np.ndarray, Mapping[str, Any]]], evs_rate: float, options: torch.Tensor
    ) -> dict[str, Any]:
        for frames, _meta in videos:
            validate_frames(frames)
        num_frames = [len(frames) for frames, _meta in videos]
        pixel_values = torch.empty((sum(num_frames), 3, self.image_size, self.image_size), dtype=self.dtype)
        c = self.config
        for (frames, _meta), part in zip(videos, pixel_values.split(num_frames), strict=True):
            frames_to_pixel_values(frames, self.image_size, c.norm_mean, c.norm_std, out=part)
        return {
            "pixel_values_flat_video": pixel_values,  # every video's frames, written in place
            "video_num_patches": torch.tensor(num_frames),
            "frames_indices": [
                torch.as_tensor(video_frames_indices(frames, meta), dtype=torch.int64) for frames, meta in videos
            ],
            "frame_duration_ms": torch.tensor([frame_duration_ms(meta) for _f, meta in videos]),
            EVS_FIELD: float_bits(torch.full((len(videos),), evs_rate, dtype=torch.float64)),
            OPTIONS_FIELD: options.expand(len(videos), len(OPTION_NAMES)).clone(),
        }

    def image_replacement(self, num_tiles: int) -> PromptUpdateDetails:
        """`<img>`, the image's visual tokens, `</img>`; only the visual tokens take embeddings."""
        t = self.tokens
        ids = [*t.image_start, *[t.image_context] * (num_tiles * self.tokens_per_frame), *t.image_end]
        return PromptUpdateDetails.select_token_ids(ids, [t.image_context])

    def video_replacement(
        self, num_frames: int, frames_indices: Sequence[int], duration_ms: int, evs_rate: float = 0.0
    ) -> PromptUpdateDetails:
        """Token ids of a whole video. Without EVS only the visual tokens take embeddings.
        With EVS (as in-tree) the prompt holds the retained count, all in the first frame:
        which frames keep how many is known only after the vision tower, so the model
        returns embeddings for the whole span (frame text included, `evs.py`)."""
        if not evs_rate:
            ids = video_token_ids(
                self.tokenizer, self.tokens, [self.tokens_per_frame] * num_frames, frames_indices, duration_ms
            )
            return PromptUpdateDetails.select_token_ids(ids, [self.tokens.image_context])
        retained = compute_retained_tokens_count(self.tokens_per_frame, num_frames, evs_rate)
        counts = [retained] + [0] * (num_frames - 1)
        return PromptUpdateDetails.from_seq(
            video_token_ids(self.tokenizer, self.tokens, counts, frames_indices, duration_ms)
        )


def max_num_tiles(value: object) -> int:
    """`max_num_tiles` of `mm_processor_kwargs` (default 12, as in-tree)."""
    if value is None:
        return DEFAULT_MAX_NUM_TILES
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(
            f"max_num_tiles must be a positive integer, got {str(value)[:40]!r}",
            parameter="mm_processor_kwargs.max_num_tiles",
        )
    return value


def video_frames_indices(frames: np.ndarray, metadata: Mapping[str, Any]) -> list[int]:
    validate_frames(frames)
    indices = list(metadata.get("frames_indices") or range(frames.shape[0]))
    if len(indices) != frames.shape[0]:
        raise ValueError(f"video: metadata lists {len(indices)} frames_indices for {frames.shape[0]} frames")
    return indices


class NanoVLProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> NemotronNanoVLConfig:
        return self.ctx.get_hf_config(NemotronNanoVLConfig)

    def get_hf_processor(self, **kwargs: object) -> NanoVLPreprocessor:
        return NanoVLPreprocessor(
            self.get_hf_config(),
            self.get_tokenizer(),
            self.ctx.model_config.dtype,
            self.ctx.get_mm_config().video_pruning_rate,
        )

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {}

    def get_default_tok_params(self):
        # The chat template writes every special token itself, as for the in-tree model.
        return super().get_default_tok_params().with_kwargs(add_special_tokens=False)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None, "video": None}

    def get_data_parser(self) -> MultiModalDataParser:
        return MultiModalDataParser(video_needs_metadata=True, expected_hidden_size=expected_hidden_size(self))

    def max_image_tiles(self) -> int:
        """Tiles of the largest image at the default `max_num_tiles` (thumbnail included)."""
        return DEFAULT_MAX_NUM_TILES + (1 if self.get_hf_config().use_thumbnail and DEFAULT_MAX_NUM_TILES > 1 else 0)

    def frame_token_cost(self) -> int:
        """Prompt tokens one frame costs, wrappers included (upper bound over indices)."""
        processor = self.get_hf_processor()
        longest_sep = "\nFrame 99999 sampled at 99999.99 seconds: "
        sep_len = len(processor.tokenizer.encode(longest_sep, add_special_tokens=False))
        tokens = processor.tokens
        return sep_len + len(tokens.image_start) + processor.tokens_per_frame + len(tokens.image_end)

    def get_num_frames_with_most_features(self, seq_len: int, mm_counts: Mapping[str, int]) -> int:
        image_tokens = mm_counts.get("image", 0) * self.max_image_tiles() * self.get_hf_config().tokens_per_frame
        per_video = (seq_len - image_tokens) // max(mm_counts.get("video", 0), 1)
        return max(per_video // self.frame_token_cost(), 1)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        per_tile = self.get_hf_config().tokens_per_frame
        frames = self.get_num_frames_with_most_features(seq_len, mm_counts)
        return {"image": self.max_image_tiles() * per_tile, "video": frames * per_tile}


class NanoVLDummyInputsBuilder(BaseDummyInputsBuilder[NanoVLProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PLACEHOLDER * mm_counts.get("image", 0) + VIDEO_PLACEHOLDER * mm_counts.get("video", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Any = None) -> dict:
        size = self.info.get_hf_config().force_image_size
        num_frames = self.info.get_num_frames_with_most_features(seq_len, mm_counts)
        videos = dummy_videos(
            self, width=size, height=size, num_frames=num_frames, num_videos=mm_counts.get("video", 0)
        )
        cols, rows = next((c, r) for c, r in target_ratios(DEFAULT_MAX_NUM_TILES) if c * r == DEFAULT_MAX_NUM_TILES)
        images = dummy_images(self, width=cols * size, height=rows * size, num_images=mm_counts.get("image", 0))
        return {"image": images, "video": [(video, video_metadata(num_frames)) for video in videos]}


class NanoVLMultiModalProcessor(BaseMultiModalProcessor[NanoVLProcessingInfo]):
    def apply(self, inputs, timing_ctx):
        # Check the request's options first: whatever the preprocessor's __call__ raises,
        # vLLM re-raises with the decoded media in the message (see adapter/request_checks.py).
        merged = self.info.ctx.get_merged_mm_kwargs(inputs.hf_processor_mm_kwargs)
        check_request_options(merged.get(CONFIG_KEY))
        max_num_tiles(merged.get("max_num_tiles"))
        return super().apply(inputs, timing_ctx)

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        num_frames = hf_inputs.get("video_num_patches", torch.empty(0))
        num_tiles = hf_inputs.get("image_num_patches", torch.empty(0))
        return {
            "pixel_values_flat": MultiModalFieldConfig.flat_from_sizes("image", num_tiles),
            "image_num_patches": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            IMAGE_OPTIONS_FIELD: MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            "pixel_values_flat_video": MultiModalFieldConfig.flat_from_sizes("video", num_frames),
            "video_num_patches": MultiModalFieldConfig.batched("video", keep_on_cpu=True),
            "frames_indices": MultiModalFieldConfig.batched("video", keep_on_cpu=True),
            "frame_duration_ms": MultiModalFieldConfig.batched("video", keep_on_cpu=True),
            EVS_FIELD: MultiModalFieldConfig.batched("video", keep_on_cpu=True),
            OPTIONS_FIELD: MultiModalFieldConfig.batched("video", keep_on_cpu=True),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        merged = self.info.ctx.get_merged_mm_kwargs(hf_processor_mm_kwargs)
        options = check_request_options(merged.get(CONFIG_KEY))
        tiles_max = max_num_tiles(merged.get("max_num_tiles"))
        config = self.info.get_hf_config()

        def image(item_idx: int) -> PromptUpdateDetails:
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
            tiles = num_tiles(size.width, size.height, config.force_image_size, tiles_max, config.use_thumbnail)
            return processor.image_replacement(tiles)

        def video(item_idx: int) -> PromptUpdateDetails:
            frames, metadata = mm_items["video"][item_idx]
            return processor.video_replacement(
                frames.shape[0],
                video_frames_indices(frames, metadata),
                frame_duration_ms(metadata),
                evs_rate_of(options, processor.video_pruning_rate),
            )

        return [
            PromptReplacement(modality="image", target=[processor.tokens.image_context], replacement=image),
            PromptReplacement(modality="video", target=[processor.tokens.video], replacement=video),
        ]
