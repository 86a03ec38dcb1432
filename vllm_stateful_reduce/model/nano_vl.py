"""Hybrid video VLM for Nemotron Nano VL v2 checkpoints (RADIO + mlp1 + NemotronH).

Laid out like vLLM's in-tree `nano_nemotron_vl.py` and loading the same checkpoint
parameter for parameter, but importable on a CPU install (no torchvision) and
video-only. The language model is vLLM's own NemotronH.
"""

from collections.abc import Iterable
from functools import partial
from typing import cast

import torch
import torch.nn as nn
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.layers.activation import ReLUSquaredActivation
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import (
    HasInnerState,
    IsHybrid,
    MultiModalEmbeddings,
    SupportsMultiModal,
)
from vllm.model_executor.models.nemotron_h import NemotronHForCausalLM
from vllm.model_executor.models.radio import RadioModel
from vllm.model_executor.models.utils import maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors
from vllm.tokenizers import cached_tokenizer_from_config

from .. import HF_OVERRIDES
from ..adapter.config_hook import register_source_model_type
from ..adapter.model_parts import language_model_part, tower_model_part
from ..adapter.model_state import model_state_cls
from ..adapter.runner_glue import ReducingModel, install_runner_glue
from ..config import ReductionConfig, from_additional_config
from ..log import describe
from ..media_fields import EVS_FIELD, float_values
from ..state import RunnerBatch
from .evs import evs_video_embeddings
from .hf_config import NemotronNanoVLConfig, NemotronNanoVLSourceConfig, radio_config_from
from .processing import NanoVLDummyInputsBuilder, NanoVLMultiModalProcessor, NanoVLProcessingInfo, video_token_ids
from .reduced_stack import ReducibleNemotronHForCausalLM
from .tokens import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, SpecialTokens

logger = init_logger(__name__)
register_source_model_type(NemotronNanoVLSourceConfig)  # this process loads the plugin's model

# RADIO checkpoints carry no layer scale; vLLM keeps these at `initializer_factor`.
_VISION_PARAMS_NOT_IN_CHECKPOINT = (".ls1", ".ls2")


def _items(value: object) -> list:
    """A batched multimodal field as a list of per-item values."""
    return list(value) if isinstance(value, (list, tuple)) else list(cast(torch.Tensor, value))


def _flat_pixels(value: object) -> torch.Tensor:
    """Every item's tiles or frames in one (n, 3, S, S) tensor (the batcher may have
    stacked same-shape items, or left a list)."""
    if isinstance(value, (list, tuple)):
        return torch.cat([torch.as_tensor(v).flatten(0, -4) for v in value])
    pixels = cast(torch.Tensor, value)
    return pixels.flatten(0, -4)


def _per_item_floats(value: object) -> list[float]:
    """A per-item float64 field the processor sent as int64 bits (`media_fields.float_bits`)."""
    return float_values(torch.stack([torch.as_tensor(v).flatten() for v in _items(value)]))


def pixel_shuffle(x: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """(n, h, w, c) -> (n, h*s, w*s, c/s^2): space-to-depth, `ps_version` v2 layout."""
    n, h, w, c = x.shape
    r = int(round(1 / scale_factor))
    x = x.view(n, h // r, r, w // r, r, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, h // r, w // r, c * r * r)


@MULTIMODAL_REGISTRY.register_processor(
    NanoVLMultiModalProcessor, info=NanoVLProcessingInfo, dummy_inputs=NanoVLDummyInputsBuilder
)
class NemotronNanoVLStatefulReduce(nn.Module, HasInnerState, IsHybrid, SupportsMultiModal, ReducingModel):
    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_PLACEHOLDER
        return VIDEO_PLACEHOLDER if modality.startswith("video") else None

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        if not isinstance(config, NemotronNanoVLConfig):
            raise ValueError(
                f"the config was parsed by {type(config).__name__} (the checkpoint's remote code?), not the plugin's "
                f"NemotronNanoVLConfig: select the plugin with --plugin stateful-reduce, or give "
                f"hf_overrides={HF_OVERRIDES} (vllm_stateful_reduce.HF_OVERRIDES)"
            )
        install_runner_glue()  # only processes that build this model get the V1 runner's wrappers
        if getattr(config, "ps_version", "v2") != "v2":
            raise ValueError(f"ps_version={config.ps_version!r} is not supported (only 'v2')")
        self.config = config
        self._configs: dict[tuple, ReductionConfig] = {}
        self.downsample_ratio = config.downsample_ratio
        self.patch_size = config.patch_size

        self.reduction = from_additional_config(vllm_config.additional_config)  # checked at start-up
        logger.info_once(
            "stateful_reduce: %s", describe(self.reduction, config.text_config.hybrid_override_pattern), scope="local"
        )
        self.tokenizer = cached_tokenizer_from_config(vllm_config.model_config)
        self.tokens = tokens = SpecialTokens.from_tokenizer(self.tokenizer)
        stale = getattr(config, "img_context_token_id", None)
        if stale is not None and stale != tokens.image_context:
            logger.warning_once(
                "config.json's img_context_token_id %s is not the tokenizer's <image> id %d; the tokenizer's is used "
                "(as by vLLM's in-tree model)",
                stale,
                tokens.image_context,
            )
        text_vllm_config = vllm_config.with_hf_config(config.text_config, architectures=["NemotronHForCausalLM"])
        language_prefix = maybe_prefix(prefix, "language_model")
        with (
            language_model_part(self, vllm_config),
            set_current_vllm_config(text_vllm_config, prefix=language_prefix),
        ):
            self.language_model = ReducibleNemotronHForCausalLM(
                vllm_config=text_vllm_config, prefix=language_prefix, prompt_markers=tokens.markers()
            )
        dtype = vllm_config.model_config.dtype
        with tower_model_part(self, vllm_config, {"image", "video"}):
            self.vision_model = RadioModel(config=radio_config_from(config)).to(dtype)
            shuffled = config.vit_hidden_size * int(round(1 / self.downsample_ratio)) ** 2
            self.mlp1 = nn.Sequential(
                RMSNorm(hidden_size=shuffled, eps=1e-5),
                nn.Linear(shuffled, config.projector_hidden_size, bias=False),
                ReLUSquaredActivation(),
                nn.Linear(config.projector_hidden_size, config.text_config.hidden_size, bias=False),
            ).to(dtype)

    def set_batch(self, batch: RunnerBatch) -> None:
        self.language_model.model.batch = batch

    def bind_attention_groups(self, groups: list) -> None:
        """Called by the runner glue once its attention groups have their builders."""
        self.language_model.model.bind_attention_groups(groups)

    def attention_groups_bound(self) -> bool:
        return self.language_model.model.attention_groups is not None

    def get_model_state_cls(self) -> type:
        """Model Runner V2's per-request state for this model (adapter/model_state.py)."""
        return model_state_cls()

    def request_config(self, overrides: dict | None) -> ReductionConfig:
        key = tuple(sorted((overrides or {}).items()))
        if key not in self._configs:
            self._configs[key] = self.reduction.with_overrides(overrides)
        return self._configs[key]

    @property
    def reduction_state(self):
        return self.language_model.model.state

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles or frames, 3, S, S) -> (same, tokens_per_frame, llm_hidden), the vision
        tower run on `vision_micro_batch` of them at a time (vLLM's in-tree model: 128), so
        a long video's activation peak stays that of one micro-batch."""
        step = self.reduction.vision_micro_batch
        return torch.cat([self._features(pixel_values[i : i + step]) for i in range(0, len(pixel_values), step)])

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        _, vit_embeds = self.vision_model(pixel_values.to(cast(nn.Linear, self.mlp1[1]).weight.dtype))
        side = pixel_values.shape[-1] // self.patch_size
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], side, side, -1)
        vit_embeds = pixel_shuffle(vit_embeds, self.downsample_ratio)
        return self.mlp1(vit_embeds.flatten(1, 2))

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """Embeddings of one modality's items (vLLM groups items by modality), in order:
        an image's tiles, thumbnail last; a video's frames, or with EVS its whole span."""
        if kwargs.get("pixel_values_flat") is not None:
            return self._image_embeddings(kwargs)
        if kwargs.get("pixel_values_flat_video") is not None:
            return self._video_embeddings(kwargs)
        return []

    def _image_embeddings(self, kwargs: dict) -> MultiModalEmbeddings:
        tiles = _flat_pixels(kwargs["pixel_values_flat"])
        counts = torch.as_tensor(kwargs["image_num_patches"]).flatten().tolist()
        features = self.extract_feature(tiles)
        return tuple(t.reshape(-1, features.shape[-1]) for t in features.split(counts))

    def _video_embeddings(self, kwargs: dict) -> MultiModalEmbeddings:
        frames = _flat_pixels(kwargs["pixel_values_flat_video"])
        num_frames = torch.as_tensor(kwargs["video_num_patches"]).flatten().tolist()
        rates = _per_item_floats(kwargs[EVS_FIELD])
        indices = [torch.as_tensor(f).flatten().tolist() for f in _items(kwargs["frames_indices"])]
        durations = torch.as_tensor(kwargs["frame_duration_ms"]).flatten().tolist()
        features = self.extract_feature(frames).split(num_frames)  # per video: (frames, tokens, hidden)
        out = []
        for video, rate, frames_indices, duration in zip(features, rates, indices, durations, strict=True):
            if not rate:
                out.append(video.reshape(-1, video.shape[-1]))
                continue
            out.append(
                evs_video_embeddings(
                    video,
                    rate,
                    partial(
                        video_token_ids,
                        self.tokenizer,
                        self.tokens,
                        frames_indices=frames_indices,
                        duration_ms=int(duration),
                    ),
                    self.tokens.image_context,
                    self.language_model.model.embed_tokens,
                )
            )
        return tuple(out)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        return self.language_model(
            input_ids=input_ids,
            positions=positions,
            intermediate_tensors=intermediate_tensors,
            inputs_embeds=inputs_embeds,
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint names -> modules, returning every parameter set so vLLM can
        refuse a checkpoint that leaves one uninitialised."""
        vision: list[tuple[str, torch.Tensor]] = []
        mlp1 = dict(self.mlp1.named_parameters())
        loaded: set[str] = set()

        def language_weights():
            for name, tensor in weights:
                if name.startswith("language_model."):
                    yield name.removeprefix("language_model."), tensor
                elif name.startswith("mlp1."):
                    key = name.removeprefix("mlp1.")
                    default_weight_loader(mlp1[key], tensor)
                    loaded.add(name)
                elif name.startswith("vision_model.radio_model."):
                    vision.append((name.removeprefix("vision_model."), tensor))
                else:
                    raise ValueError(f"unexpected checkpoint tensor {name!r}")

        loaded |= {f"language_model.{n}" for n in self.language_model.load_weights(language_weights())}
        loaded |= {f"vision_model.{n}" for n in self.vision_model.load_weights(vision)}
        loaded |= {
            name
            for name, _ in self.named_parameters()
            if name.startswith("vision_model.") and name.endswith(_VISION_PARAMS_NOT_IN_CHECKPOINT)
        }
        return loaded

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        text = vllm_config.with_hf_config(vllm_config.model_config.hf_config.text_config)
        return NemotronHForCausalLM.get_mamba_state_shape_from_config(text)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        text = vllm_config.with_hf_config(vllm_config.model_config.hf_config.text_config)
        return NemotronHForCausalLM.get_mamba_state_dtype_from_config(text)

    @classmethod
    def get_mamba_state_copy_func(cls):
        return NemotronHForCausalLM.get_mamba_state_copy_func()
