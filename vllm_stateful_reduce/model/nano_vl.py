"""Hybrid video VLM for Nemotron Nano VL v2 checkpoints (RADIO + mlp1 + NemotronH).

Laid out like vLLM's in-tree `nano_nemotron_vl.py` and loading the same checkpoint
parameter for parameter, but importable on a CPU install (no torchvision) and
video-only. The language model is vLLM's own NemotronH.
"""

from collections.abc import Iterable
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

from .. import vllm_compat
from ..config import from_additional_config
from ..log import describe
from ..plan import VisualTokens
from ..state import RequestInfo, RunnerBatch
from .hf_config import IMG_END, NemotronNanoVLConfig, radio_config_from
from .processing import NanoVLDummyInputsBuilder, NanoVLMultiModalProcessor, NanoVLProcessingInfo
from .reduced_stack import ReducibleNemotronHForCausalLM

logger = init_logger(__name__)

# RADIO checkpoints carry no layer scale; vLLM keeps these at `initializer_factor`.
_VISION_PARAMS_NOT_IN_CHECKPOINT = (".ls1", ".ls2")


def pixel_shuffle(x: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """(n, h, w, c) -> (n, h*s, w*s, c/s^2): space-to-depth, `ps_version` v2 layout."""
    n, h, w, c = x.shape
    r = int(round(1 / scale_factor))
    x = x.view(n, h // r, r, w // r, r, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, h // r, w // r, c * r * r)


@MULTIMODAL_REGISTRY.register_processor(
    NanoVLMultiModalProcessor, info=NanoVLProcessingInfo, dummy_inputs=NanoVLDummyInputsBuilder
)
class NemotronNanoVLStatefulReduce(nn.Module, HasInnerState, IsHybrid, SupportsMultiModal):
    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return "<video>" if modality.startswith("video") else None

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: NemotronNanoVLConfig = vllm_config.model_config.hf_config
        if getattr(config, "ps_version", "v2") != "v2":
            raise ValueError(f"ps_version={config.ps_version!r} is not supported (only 'v2')")
        self.config = config
        self._configs: dict[tuple, object] = {}
        self.downsample_ratio = config.downsample_ratio
        self.patch_size = config.patch_size

        self.reduction = from_additional_config(vllm_config.additional_config)  # checked at start-up
        logger.info_once(
            "stateful_reduce: %s", describe(self.reduction, config.text_config.hybrid_override_pattern), scope="local"
        )
        tokenizer = cached_tokenizer_from_config(vllm_config.model_config)
        visual_tokens = VisualTokens(
            context_token_id=config.img_context_token_id,
            end_length=len(tokenizer.encode(IMG_END, add_special_tokens=False)),
            tokens_per_frame=config.tokens_per_frame,
        )
        text_vllm_config = vllm_config.with_hf_config(config.text_config, architectures=["NemotronHForCausalLM"])
        language_prefix = maybe_prefix(prefix, "language_model")
        with (
            vllm_compat.language_model_part(self, vllm_config),
            set_current_vllm_config(text_vllm_config, prefix=language_prefix),
        ):
            self.language_model = ReducibleNemotronHForCausalLM(
                vllm_config=text_vllm_config, prefix=language_prefix, visual_tokens=visual_tokens
            )
        dtype = vllm_config.model_config.dtype
        with vllm_compat.tower_model_part(self, vllm_config, "video"):
            self.vision_model = RadioModel(config=radio_config_from(config)).to(dtype)
            shuffled = config.vit_hidden_size * int(round(1 / self.downsample_ratio)) ** 2
            self.mlp1 = nn.Sequential(
                RMSNorm(hidden_size=shuffled, eps=1e-5),
                nn.Linear(shuffled, config.projector_hidden_size, bias=False),
                ReLUSquaredActivation(),
                nn.Linear(config.projector_hidden_size, config.text_config.hidden_size, bias=False),
            ).to(dtype)

    def set_batch(self, requests: list[tuple], block_tables: list[torch.Tensor]) -> None:
        """Called by the runner glue before each forward: for every row of the batch in
        batch order (req_id, prompt length, per-request overrides, tokens computed
        before this step, tokens of this step, prompt token ids), and the block table
        of every KV-cache group."""
        self.language_model.model.batch = RunnerBatch(
            tuple(
                RequestInfo(req_id, num_prompt, self._request_config(overrides), computed, scheduled, prompt_ids)
                for req_id, num_prompt, overrides, computed, scheduled, prompt_ids in requests
            ),
            tuple(block_tables),
        )

    def bind_attention_groups(self, groups: list) -> None:
        """Called by the runner glue once its attention groups have their builders."""
        self.language_model.model.bind_attention_groups(groups)

    def attention_groups_bound(self) -> bool:
        return self.language_model.model.attention_groups is not None

    def get_model_state_cls(self) -> type:
        """Model Runner V2's per-request state for this model (see vllm_compat)."""
        return vllm_compat.model_state_cls()

    def _request_config(self, overrides: dict | None):
        key = tuple(sorted((overrides or {}).items()))
        if key not in self._configs:
            self._configs[key] = self.reduction.with_overrides(overrides)
        return self._configs[key]

    @property
    def reduction_state(self):
        return self.language_model.model.state

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(frames, 3, S, S) -> (frames, tokens_per_frame, llm_hidden)."""
        _, vit_embeds = self.vision_model(pixel_values.to(cast(nn.Linear, self.mlp1[1]).weight.dtype))
        side = pixel_values.shape[-1] // self.patch_size
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], side, side, -1)
        vit_embeds = pixel_shuffle(vit_embeds, self.downsample_ratio)
        return self.mlp1(vit_embeds.flatten(1, 2))

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.get("pixel_values_flat_video")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            frames = torch.cat(list(pixel_values))
        else:
            frames = cast(torch.Tensor, pixel_values)
            if frames.ndim == 5:  # same-shape videos stacked by the batcher
                frames = frames.flatten(0, 1)
        num_frames = torch.as_tensor(kwargs["video_num_patches"]).flatten().tolist()
        features = self.extract_feature(frames)  # all frames of all videos
        hidden = self.config.text_config.hidden_size
        per_video = features.split(num_frames)
        return tuple(v.reshape(-1, hidden) for v in per_video)

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
