"""HF config classes for Nemotron Nano VL v2 checkpoints, parsed without remote code.

The real checkpoint's `config.json` names remote code in `auto_map`. The plugin's class
is registered in vLLM's config registry under the plugin's architecture name, which is
also its `model_type`: a real checkpoint is parsed by it once `HF_OVERRIDES` (the
`--plugin` flag) sets that `model_type`, a checkpoint built here says it itself.
Transformers' `AutoConfig` learns the real checkpoints' own `model_type`
(`NemotronNanoVLSourceConfig`) only in processes that configure or load the plugin's
model (`adapter.config_hook.register_source_model_type`).
"""

from typing import Any

from transformers import NemotronHConfig, PretrainedConfig
from vllm.transformers_utils.configs.radio import VIT_TIMM_DIM_BY_NAME, RadioConfig

from .. import ARCHITECTURE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class NemotronNanoVLConfig(PretrainedConfig):
    """Composite config: `llm_config` (NemotronH) + `vision_config` (RADIO) + projector.

    Mirrors the checkpoint's own configuration class: JSON key `llm_config` becomes
    the attribute `text_config`; `vision_config` keeps its raw `args` dict, which
    vLLM's RADIO model reads.
    """

    model_type = ARCHITECTURE  # the plugin's own: vLLM's config registry key (adapter.config_hook)

    def __init__(
        self,
        vision_config: dict[str, Any] | PretrainedConfig | None = None,
        llm_config: dict[str, Any] | None = None,
        text_config: NemotronHConfig | dict[str, Any] | None = None,
        force_image_size: int = 512,
        patch_size: int = 16,
        downsample_ratio: float = 0.5,
        template: str | None = None,
        ps_version: str = "v2",
        image_tag_type: str = "internvl",
        projector_hidden_size: int = 4096,
        vit_hidden_size: int = 1280,
        video_pruning_rate: float = 0.0,
        norm_mean: tuple[float, float, float] | list[float] = IMAGENET_MEAN,
        norm_std: tuple[float, float, float] | list[float] = IMAGENET_STD,
        use_thumbnail: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        text = text_config if text_config is not None else llm_config
        if isinstance(text, NemotronHConfig):
            self.text_config = text
        else:
            self.text_config = NemotronHConfig(**(text or {}))
        if isinstance(vision_config, PretrainedConfig):
            self.vision_config = vision_config
        else:
            self.vision_config = PretrainedConfig(**(vision_config or {"args": {}}))
        if not hasattr(self.vision_config, "args"):
            self.vision_config.args = {}
        self.force_image_size = force_image_size
        self.patch_size = patch_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.ps_version = ps_version
        self.image_tag_type = image_tag_type
        self.projector_hidden_size = projector_hidden_size
        self.vit_hidden_size = vit_hidden_size
        self.video_pruning_rate = video_pruning_rate
        self.norm_mean = list(norm_mean)
        self.norm_std = list(norm_std)
        self.use_thumbnail = use_thumbnail

    def to_dict(self) -> dict[str, Any]:
        """Serialise with the checkpoint's key names (`llm_config`)."""
        out = super().to_dict()
        text = out.pop("text_config")
        out["llm_config"] = text if isinstance(text, dict) else text.to_dict()
        vision = out["vision_config"]
        if not isinstance(vision, dict):
            out["vision_config"] = vision.to_dict()
        return out

    @property
    def tokens_per_frame(self) -> int:
        """LLM tokens per video frame: (side / patch)^2 * downsample^2 (256 for 512 px)."""
        side = self.force_image_size // self.patch_size
        return int(side * side * self.downsample_ratio**2)


class NemotronNanoVLSourceConfig(NemotronNanoVLConfig):
    """The same config under the real checkpoints' own `model_type`, for transformers'
    `AutoConfig` (vLLM loads tokenizers through it without `hf_overrides`)."""

    model_type = "NemotronH_Nano_VL_V2"

    def __init__(self, **kwargs: Any) -> None:  # transformers would generate one that skips the parent's
        super().__init__(**kwargs)


class SizedRadioConfig(RadioConfig):
    """vLLM's RadioConfig, but the ViT width/depth/heads/MLP can be given directly.

    vLLM looks the dims up by timm `model_name`; small checkpoints built here name
    `vit_custom` and carry `hidden_size`, `num_hidden_layers`, `num_attention_heads`
    and `intermediate_size` in `vision_config.args`. Known names keep their table dims.
    """

    def __init__(
        self,
        model_name: str,
        hidden_size: int | None = None,
        num_hidden_layers: int | None = None,
        num_attention_heads: int | None = None,
        intermediate_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        dims = (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size)
        if model_name in VIT_TIMM_DIM_BY_NAME:
            super().__init__(model_name=model_name, **kwargs)
            return
        if any(d is None for d in dims):
            raise ValueError(
                f"vision_config.args.model={model_name!r} is not a known timm ViT "
                f"({sorted(VIT_TIMM_DIM_BY_NAME)}); give hidden_size, "
                "num_hidden_layers, num_attention_heads and intermediate_size in "
                "vision_config.args"
            )
        # RadioConfig's __init__ reads the table; start from any entry, then set ours.
        super().__init__(model_name="vit_small_patch16_224", **kwargs)
        self.model_name = model_name
        (
            self.hidden_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.intermediate_size,
        ) = dims


def radio_prefix_tokens(args: dict) -> int:
    """Tokens RADIO puts before the patches (and drops after the ViT): cls tokens (one per
    distinct teacher name, or one) padded with registers to `register_multiple` (vLLM's
    radio.py rule)."""
    cls_tokens = len({t["name"] for t in args.get("teachers", ())}) if args.get("cls_token_per_teacher") else 1
    multiple = args.get("register_multiple") or 0
    return cls_tokens + (multiple - cls_tokens % multiple if multiple else 0)


def radio_config_from(config: NemotronNanoVLConfig) -> SizedRadioConfig:
    """Build the RADIO config the way vLLM's in-tree Nano VL model does."""
    vision = config.vision_config
    args = dict(vision.args)
    model_name = args.pop("model", None)
    if model_name is None:
        raise ValueError("vision_config.args.model is required")
    preferred = getattr(vision, "preferred_resolution", None)
    return SizedRadioConfig(
        model_name=model_name,
        image_size=preferred[0] if preferred else 224,
        patch_size=getattr(vision, "patch_size", 16),
        norm_mean=config.norm_mean,
        norm_std=config.norm_std,
        **args,
    )
