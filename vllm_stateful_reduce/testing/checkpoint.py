"""Build small Nemotron Nano VL v2 checkpoints in the real layout (random weights).

The tensor names, shapes and config keys are those of the real checkpoint
(`language_model.backbone.*`, `vision_model.radio_model.*`, `mlp1.*`;
`llm_config` / `vision_config.args`), so vLLM loads them through the same path.
The language model comes from transformers' own NemotronH, an implementation
independent of vLLM's.

    python -m vllm_stateful_reduce.testing.checkpoint OUT_DIR [--hidden-size 128 ...]
"""

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import NemotronHConfig, NemotronHForCausalLM

from .. import ARCHITECTURE
from ..model.hf_config import NemotronNanoVLConfig, radio_prefix_tokens
from .tokenizer import build_tokenizer


@dataclass
class CheckpointSpec:
    """Sizes of a small model. Defaults give a ~3M-parameter model that runs fast on CPU."""

    # Nano's block kinds (M Mamba2, * attention, - MLP); an early attention block so
    # that a 25% depth-averaged budget is reachable with boundaries after attention.
    pattern: str = "M*-M-M*-M-M*-"
    hidden_size: int = 128
    vocab_size: int = 512
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 256
    mamba_num_heads: int = 8
    mamba_head_dim: int = 16
    ssm_state_size: int = 16
    n_groups: int = 2
    conv_kernel: int = 4
    chunk_size: int = 64
    image_size: int = 64  # frame side in pixels
    patch_size: int = 16
    vit_hidden_size: int = 64
    vit_layers: int = 2
    vit_heads: int = 2
    vit_mlp: int = 128
    projector_hidden_size: int = 256
    max_position_embeddings: int = 32768
    seed: int = 0
    # RADIO's position grid covers `cpe_max_size` px (vLLM interpolates it to the frame
    # grid, as RADIO's CPE does); 0: the frame size, so nothing is interpolated
    cpe_max_size: int = 0
    teachers: tuple[str, ...] = ("clip", "siglip")  # one cls token each; registers pad to 8

    @property
    def prefix_args(self) -> dict:
        return {"register_multiple": 8, "teachers": [{"name": t} for t in self.teachers], "cls_token_per_teacher": True}

    @property
    def position_grid(self) -> int:
        return (self.cpe_max_size or self.image_size) // self.patch_size

    def text_config(self) -> NemotronHConfig:
        return NemotronHConfig(
            architectures=["NemotronHForCausalLM"],
            hybrid_override_pattern=self.pattern,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            mamba_num_heads=self.mamba_num_heads,
            mamba_head_dim=self.mamba_head_dim,
            ssm_state_size=self.ssm_state_size,
            n_groups=self.n_groups,
            conv_kernel=self.conv_kernel,
            chunk_size=self.chunk_size,
            max_position_embeddings=self.max_position_embeddings,
            mamba_ssm_cache_dtype="float32",
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )

    def config(self) -> NemotronNanoVLConfig:
        vision = {
            "model_type": "radio",
            "patch_size": self.patch_size,
            "preferred_resolution": [self.image_size, self.image_size],
            "args": {
                "model": "vit_custom",
                "hidden_size": self.vit_hidden_size,
                "num_hidden_layers": self.vit_layers,
                "num_attention_heads": self.vit_heads,
                "intermediate_size": self.vit_mlp,
                "cpe_max_size": self.cpe_max_size or self.image_size,
                **self.prefix_args,
            },
        }
        return NemotronNanoVLConfig(
            architectures=[ARCHITECTURE],
            llm_config=self.text_config().to_dict(),
            vision_config=vision,
            force_image_size=self.image_size,
            patch_size=self.patch_size,
            downsample_ratio=0.5,
            template="nemotron_h",
            ps_version="v2",
            projector_hidden_size=self.projector_hidden_size,
            vit_hidden_size=self.vit_hidden_size,
            dtype="bfloat16",
        )


def vision_tensors(spec: CheckpointSpec, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """RADIO (timm ViT) tensors under the checkpoint's names, incl. buffers vLLM skips."""
    d, i, p = spec.vit_hidden_size, spec.vit_mlp, spec.patch_size
    skip = radio_prefix_tokens(spec.prefix_args)  # cls tokens + registers
    grid = spec.position_grid**2

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    prefix = "vision_model.radio_model."
    out = {
        "model.patch_generator.embedder.weight": rand(d, 3 * p * p),
        "model.patch_generator.pos_embed": rand(1, grid, d),
        "model.patch_generator.cls_token.token": rand(skip, d),
        "input_conditioner.norm_mean": torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1),
        "input_conditioner.norm_std": torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1),
        "summary_idxs": torch.arange(len(spec.teachers)),  # one cls token per teacher
    }
    for layer in range(spec.vit_layers):
        b = f"model.blocks.{layer}."
        out |= {
            b + "norm1.weight": 1 + rand(d, std=0.1),
            b + "norm1.bias": rand(d),
            b + "attn.qkv.weight": rand(3 * d, d),
            b + "attn.qkv.bias": rand(3 * d),
            b + "attn.proj.weight": rand(d, d),
            b + "attn.proj.bias": rand(d),
            b + "norm2.weight": 1 + rand(d, std=0.1),
            b + "norm2.bias": rand(d),
            b + "mlp.fc1.weight": rand(i, d),
            b + "mlp.fc1.bias": rand(i),
            b + "mlp.fc2.weight": rand(d, i),
            b + "mlp.fc2.bias": rand(d),
        }
    return {prefix + k: v for k, v in out.items()}


def projector_tensors(spec: CheckpointSpec, gen: torch.Generator) -> dict[str, torch.Tensor]:
    shuffled = spec.vit_hidden_size * 4  # pixel shuffle 0.5
    return {
        "mlp1.0.weight": 1 + 0.1 * torch.randn(shuffled, generator=gen),
        "mlp1.1.weight": torch.randn(spec.projector_hidden_size, shuffled, generator=gen) * shuffled**-0.5,
        "mlp1.3.weight": torch.randn(spec.hidden_size, spec.projector_hidden_size, generator=gen)
        * spec.projector_hidden_size**-0.5,
    }


def language_tensors(spec: CheckpointSpec, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """transformers' NemotronH init, every tensor perturbed so that none is constant
    (a norm loaded into the wrong slot must change the output)."""
    torch.manual_seed(spec.seed)
    model = NemotronHForCausalLM(spec.text_config()).float()
    state = {}
    for name, t in model.state_dict().items():
        state[f"language_model.{name}"] = t + 0.02 * torch.randn(t.shape, generator=gen)
    return state


def build_checkpoint(out_dir: str | Path, spec: CheckpointSpec | None = None, reserved_tokens: int = 0) -> Path:
    """Write config.json, model.safetensors (bf16) and tokenizer files to `out_dir`."""
    spec = spec or CheckpointSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out, vocab_size=spec.vocab_size, reserved=reserved_tokens)
    if len(tokenizer) > spec.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens > vocab_size {spec.vocab_size}")
    gen = torch.Generator().manual_seed(spec.seed)
    tensors = language_tensors(spec, gen) | vision_tensors(spec, gen) | projector_tensors(spec, gen)
    tensors = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = spec.config()
    config.img_context_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config.save_pretrained(out)
    (out / "build_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return out


# The real 62-block pattern of Nemotron Nano 12B v2 (28 Mamba2, 6 attention, 28 MLP).
NANO_PATTERN = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"
# The real config's ratios at small widths: 5:1 GQA, FFN 4x, Mamba 2x hidden in 8 groups,
# 512 px tiles, a 2048 px position grid, four teachers' cls tokens + 4 registers.
RECIPE_SPEC = CheckpointSpec(
    pattern=NANO_PATTERN,
    hidden_size=64,
    num_attention_heads=5,
    num_key_value_heads=1,
    head_dim=32,  # the smallest vLLM's CPU attention runs
    intermediate_size=256,
    mamba_num_heads=8,
    mamba_head_dim=16,
    ssm_state_size=16,
    n_groups=8,
    image_size=512,
    vit_hidden_size=32,
    vit_layers=1,
    vit_heads=2,
    vit_mlp=64,
    projector_hidden_size=256,
    cpe_max_size=2048,
    teachers=("clip", "siglip", "dino_v2", "sam"),
)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
REMOTE_CODE = Path(__file__).parent / "remote_code"


def build_recipe_checkpoint(out_dir: str | Path, spec: CheckpointSpec = RECIPE_SPEC) -> Path:
    """A small checkpoint that looks like the real Nano 12B v2 VL to vLLM: the real
    config.json field set and values (only widths shrunk), `auto_map` to a config
    module shipped in the folder (`remote_code/`, so `--trust-remote-code` runs remote
    code), a tokenizer whose media tokens sit at other ids than the config's stale
    `img_context_token_id` 18, and a RADIO position grid larger than the frame grid."""
    out = build_checkpoint(out_dir, spec, reserved_tokens=20)
    ours = json.loads((out / "config.json").read_text())
    vision = ours["vision_config"] | {
        "auto_map": {"AutoConfig": "configuration_radio.RADIOConfig"},
        "version": "radio_v2.5-h",
        "max_resolution": spec.cpe_max_size,
        "model_type": "radio",
    }
    vision.pop("preferred_resolution")  # not known to be in the real one: vLLM then assumes 224
    config = {
        "architectures": ["NemotronH_Nano_VL_V2"],
        "model_type": "NemotronH_Nano_VL_V2",
        "auto_map": {
            "AutoConfig": "configuration.NemotronH_Nano_VL_V2_Config",
            "AutoModel": "modeling.NemotronH_Nano_VL_V2",
        },
        "force_image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "image_tag_type": "internvl",
        "template": None,
        "use_thumbnail": True,
        "vit_hidden_size": spec.vit_hidden_size,
        "projector_hidden_size": spec.projector_hidden_size,
        "norm_mean": CLIP_MEAN,
        "norm_std": CLIP_STD,
        "img_context_token": "<image>",
        "img_start_token": "<img>",
        "img_end_token": "</img>",
        "video_context_token": "<video>",
        "img_context_token_id": 18,  # a sibling config's value: not this tokenizer's <image>
        "video_pruning_rate": 0.0,
        "torch_dtype": "bfloat16",
        "llm_config": ours["llm_config"] | {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h"},
        "vision_config": vision,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for module in REMOTE_CODE.glob("configuration*.py"):
        (out / module.name).write_text(module.read_text())
    # the mean/std the tensors of the input conditioner carry (vLLM takes the config's)
    tensors = load_file(out / "model.safetensors")
    tensors["vision_model.radio_model.input_conditioner.norm_mean"] = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    tensors["vision_model.radio_model.input_conditioner.norm_std"] = torch.tensor(CLIP_STD).view(3, 1, 1)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def resize_frames(checkpoint: str | Path, image_size: int, out_dir: str | Path) -> Path:
    """A copy of `checkpoint` for `image_size` px frames: the ViT's position embeddings
    bilinearly interpolated to the new patch grid (what RADIO's CPE does at run time, made
    permanent so the position grid equals the frame grid) and the image-size fields updated."""
    src, out = Path(checkpoint), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    grid = image_size // config["patch_size"]
    tensors = load_file(src / "model.safetensors")
    name = "vision_model.radio_model.model.patch_generator.pos_embed"
    pos = tensors[name]
    old = math.isqrt(pos.shape[1])
    square = pos.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    resized = F.interpolate(square, size=(grid, grid), mode="bilinear", align_corners=False)
    tensors[name] = resized.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype).contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config["force_image_size"] = image_size
    config["vision_config"]["preferred_resolution"] = [image_size, image_size]
    config["vision_config"]["args"]["cpe_max_size"] = image_size
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if (src / "build_spec.json").exists():
        spec = json.loads((src / "build_spec.json").read_text()) | {"image_size": image_size}
        (out / "build_spec.json").write_text(json.dumps(spec, indent=2))
    for f in src.iterdir():
        if not (out / f.name).exists():
            (out / f.name).write_bytes(f.read_bytes())
    return out


def export_language_model(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """The checkpoint's NemotronH alone, as a text-only `NemotronHForCausalLM` checkpoint."""
    src, out = Path(checkpoint), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(src / "model.safetensors")
    save_file(
        {k.removeprefix("language_model."): v for k, v in tensors.items() if k.startswith("language_model.")},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    config = json.loads((src / "config.json").read_text())
    text = config["llm_config"] | {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h"}
    text["dtype"] = config.get("dtype", "bfloat16")
    (out / "config.json").write_text(json.dumps(text, indent=2))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    for field, value in asdict(CheckpointSpec()).items():
        if not isinstance(value, (int, float, str)):
            continue
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args())
    out = build_checkpoint(args.pop("out_dir"), CheckpointSpec(**args))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
