"""FLOP model of a (reduced) prefill of the NemotronH language model.

What a measured speedup should be compared with: the floating-point work of one
prompt's prefill, block by block, when block b processes only the text and the
visual tokens its stage keeps. The schedule is the plugin's own
(`build_schedule(pattern, config).keep_counts(...)`), and EVS before the LLM uses
vLLM's own count (`compute_retained_tokens_count`), so the model follows the code.

Notation (one sequence; a block processes L rows):
  d  hidden                    H_a, H_kv, d_h  attention heads, KV heads, head dim
  H, P  Mamba heads, head dim  D = H*P  Mamba inner width     N  state   G  groups
  K  conv kernel               F  FFN width                   l  scan chunk length
A FLOP is a multiply or an add (a multiply-add is 2).

Mamba2 block ("M"), x: (L, d)
  1. in_proj   (L, d) @ (d, 2D + 2GN + H)  -> z, xBC, dt          2 L d (2D + 2GN + H)
  2. conv1d    depthwise, K taps over xBC's D + 2GN channels       2 L K (D + 2GN)
  3. SSD scan (ssd_minimal of the Mamba2 paper), chunks c of l_c <= l rows:
     a. C B^T      (l_c, N) x (N, l_c), per group                  2 l_c^2 N G
     b. (decay o CB) X   (l_c, l_c) x (l_c, P), per head            2 l_c^2 P H
     c. chunk state  B^T X   (N, l_c) x (l_c, P), per head         2 l_c N P H
     d. state passing, chunk to chunk (sequential), (H, P, N)      2 N P H per chunk
     e. output from the state  C h   (l_c, N) x (N, P), per head   2 l_c N P H
  4. out_proj  (L, D) @ (D, d)                                      2 L D d
Attention block ("*"), NoPE
  5. qkv       (L, d) @ (d, (H_a + 2 H_kv) d_h)                    2 L d (H_a + 2 H_kv) d_h
  6. causal core: query row i scores keys 0..i, per query head (GQA shares K/V, not work)
     Q K^T   sum_i 2 (i+1) d_h H_a = H_a d_h L (L+1);  P V the same   2 H_a d_h L (L+1)
  7. o_proj    (L, H_a d_h) @ (H_a d_h, d)                          2 L H_a d_h d
MLP block ("-"), squared ReLU, no gate
  8. up, down  (L, d) @ (d, F), (L, F) @ (F, d)                     4 L d F
"linear" = 1, 2, 4, 5, 7, 8 (2 x weight parameters per row); "scan" = 3; "attention" = 6.
Not counted: norms, activations, gating, the embedding lookup, the LM head (vLLM
computes logits for the last prompt row only), and the reduction's own scoring
(`scoring_flops`, reported beside it).

Scoring (the reduction's own work), per scoring block of a stage whose scores a drop uses,
for k visual tokens, Q question rows and L = T + k keys:
  Mamba2 proxy  |C_t . B_s| per group                               2 Q k G N
  attention     question rows' logits over every key, per head       2 Q L H_a d_h

Vision tower (`VisionDims`; runs on every frame, before the LLM: no reduction, nor EVS,
shortens it), per frame of p = (side / patch)^2 patches and s = p + prefix tokens:
  patch embedding  (p, 3 patch^2) @ (3 patch^2, w)                   2 p 3 patch^2 w
  per ViT block    qkv, proj, fc1, fc2 (s rows)                      2 s (4 w^2 + 2 w m)
                   full attention, Q K^T and P V                    4 s^2 w
  mlp1 projector   p r^2 rows of the pixel-shuffled (r = 0.5) patches
                   (4w -> h_p -> d)                                  2 p r^2 (4 w h_p + h_p d)

Reduced prefill: block b of stage j processes L_b = T + k_j rows (all T text tokens,
k_j visual tokens, k_0 = the visual tokens entering the LLM: V, or EVS's count), and
its attention runs causally over those L_b rows (the plugin's compacted KV layout).
"""

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from transformers import NemotronHConfig

from vllm_stateful_reduce.config import ReductionConfig
from vllm_stateful_reduce.schedule import build_schedule, stage_sizes

NANO_12B_V2_PATTERN = "M-M-M-M*-" * 6 + "M-M-M-M-"  # 28 Mamba2, 6 attention (7, 16, ..., 52), 28 MLP


@dataclass(frozen=True)
class ModelDims:
    """The language model's sizes that FLOPs depend on."""

    pattern: str
    hidden: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    mamba_heads: int
    mamba_head_dim: int
    state: int
    groups: int
    conv_kernel: int
    ffn: int
    chunk_size: int

    @classmethod
    def from_text_config(cls, c: NemotronHConfig) -> "ModelDims":
        return cls(
            pattern=c.hybrid_override_pattern,
            hidden=c.hidden_size,
            attention_heads=c.num_attention_heads,
            kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            mamba_heads=c.mamba_num_heads,
            mamba_head_dim=c.mamba_head_dim,
            state=c.ssm_state_size,
            groups=c.n_groups,
            conv_kernel=c.conv_kernel,
            ffn=c.intermediate_size,
            chunk_size=c.chunk_size,
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "ModelDims":
        """From a VL checkpoint (its `llm_config`) or a text-only NemotronH checkpoint."""
        if "llm_config" in json.loads((Path(path) / "config.json").read_text()):
            from vllm_stateful_reduce.model.hf_config import NemotronNanoVLConfig

            return cls.from_text_config(NemotronNanoVLConfig.from_pretrained(path).text_config)
        return cls.from_text_config(NemotronHConfig.from_pretrained(path))

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def mamba_inner(self) -> int:
        return self.mamba_heads * self.mamba_head_dim

    @property
    def conv_channels(self) -> int:
        return self.mamba_inner + 2 * self.groups * self.state

    def linear_params(self, kind: str) -> int:
        """Weight parameters a row is multiplied with in a block of this kind (1, 2, 4, 5, 7, 8)."""
        d = self.hidden
        if kind == "M":
            in_proj = d * (2 * self.mamba_inner + 2 * self.groups * self.state + self.mamba_heads)
            return in_proj + self.conv_kernel * self.conv_channels + self.mamba_inner * d
        if kind == "*":
            q = self.attention_heads * self.head_dim
            return d * (q + 2 * self.kv_heads * self.head_dim) + q * d
        if kind == "-":
            return 2 * d * self.ffn
        raise ValueError(f"unknown block kind {kind!r} (expected M, * or -)")


# NVIDIA Nemotron Nano 12B v2 (the language model of Nano 12B v2 VL).
NANO_12B_V2 = ModelDims(
    pattern=NANO_12B_V2_PATTERN,
    hidden=5120,
    attention_heads=40,
    kv_heads=8,
    head_dim=128,
    mamba_heads=128,
    mamba_head_dim=80,
    state=128,
    groups=8,
    conv_kernel=4,
    ffn=20480,
    chunk_size=128,
)


@dataclass(frozen=True)
class VisionDims:
    """The vision tower's sizes that FLOPs depend on: RADIO ViT (pre-norm blocks, full
    attention over a frame's patches and prefix tokens) and the `mlp1` projector."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    mlp: int
    prefix_tokens: int  # cls token(s) + registers, dropped after the ViT
    projector_hidden: int
    llm_hidden: int
    downsample: float = 0.5

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "VisionDims":
        from vllm_stateful_reduce.model.hf_config import NemotronNanoVLConfig, radio_config_from, radio_prefix_tokens

        config = NemotronNanoVLConfig.from_pretrained(path)
        radio = radio_config_from(config)
        return cls(
            image_size=config.force_image_size,
            patch_size=config.patch_size,
            width=radio.hidden_size,
            layers=radio.num_hidden_layers,
            mlp=radio.intermediate_size,
            prefix_tokens=radio_prefix_tokens(dict(config.vision_config.args)),
            projector_hidden=config.projector_hidden_size,
            llm_hidden=config.text_config.hidden_size,
            downsample=config.downsample_ratio,
        )


# The vision tower of Nemotron Nano 12B v2 VL: RADIO ViT-H/16 (timm's vit_huge_patch16_224
# sizes) at 512 px frames, 8 prefix tokens (cls per teacher + registers, the layout of the
# checkpoints built here), projector 4096 wide into the 5120-wide LLM.
RADIO_H_512 = VisionDims(
    image_size=512,
    patch_size=16,
    width=1280,
    layers=32,
    mlp=5120,
    prefix_tokens=8,
    projector_hidden=4096,
    llm_hidden=5120,
)


def vision_flops_per_frame(v: VisionDims) -> float:
    """Patch embedding, ViT blocks, projector for one frame (see the module docstring)."""
    patches = (v.image_size // v.patch_size) ** 2
    rows = patches + v.prefix_tokens
    embed = 2 * patches * 3 * v.patch_size**2 * v.width
    blocks = v.layers * (2 * rows * (4 * v.width**2 + 2 * v.width * v.mlp) + 4 * rows**2 * v.width)
    shuffled = int(patches * v.downsample**2)
    wide = int(v.width / v.downsample**2)
    projector = 2 * shuffled * (wide * v.projector_hidden + v.projector_hidden * v.llm_hidden)
    return float(embed + blocks + projector)


@dataclass(frozen=True)
class PromptTokens:
    """One request's prompt as the language model sees it."""

    visual: int  # V: video context tokens (before EVS)
    text: int  # T: every other prompt token (frame text, chat, question)
    query: int  # Q: text tokens after the video (part of T); 0 means "not reduced"
    tokens_per_frame: int = 256


@dataclass(frozen=True)
class Flops:
    linear: float
    scan: float
    attention: float

    @property
    def total(self) -> float:
        return self.linear + self.scan + self.attention

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(self.linear + other.linear, self.scan + other.scan, self.attention + other.attention)


def scan_flops(dims: ModelDims, tokens: int) -> float:
    """3a-e for one sequence of `tokens` rows (the last chunk may be short)."""
    full, rest = divmod(tokens, dims.chunk_size)
    chunks = full + (rest > 0)
    hpn = dims.mamba_heads * dims.mamba_head_dim * dims.state
    squares = full * dims.chunk_size**2 + rest**2
    return (
        2 * squares * dims.state * dims.groups  # a
        + 2 * squares * dims.mamba_head_dim * dims.mamba_heads  # b
        + 4 * tokens * hpn  # c, e
        + 2 * chunks * hpn  # d
    )


def attention_core_flops(dims: ModelDims, tokens: int) -> float:
    """6: causal Q K^T and P V over `tokens` rows."""
    return 2 * dims.attention_heads * dims.head_dim * tokens * (tokens + 1)


def block_flops(dims: ModelDims, kind: str, tokens: int) -> Flops:
    linear = 2 * dims.linear_params(kind) * tokens
    return Flops(
        linear=linear,
        scan=scan_flops(dims, tokens) if kind == "M" else 0.0,
        attention=attention_core_flops(dims, tokens) if kind == "*" else 0.0,
    )


def entering_visual(prompt: PromptTokens, config: ReductionConfig) -> int:
    """Visual tokens that enter the LLM: all, or what EVS keeps (vLLM's count)."""
    if not config.evs_rate:
        return prompt.visual
    from vllm.multimodal.video_prune.evs import compute_retained_tokens_count

    frames = prompt.visual // prompt.tokens_per_frame
    return compute_retained_tokens_count(prompt.tokens_per_frame, frames, config.evs_rate)


def visual_per_block(pattern: str, prompt: PromptTokens, config: ReductionConfig | None) -> list[int]:
    """Visual tokens each block processes, by the plugin's rules: unreduced without a
    config, when disabled, without video or query, or when EVS cannot split the
    video into whole frames; otherwise the schedule's keep count of the block's stage."""
    unreduced = [prompt.visual] * len(pattern)
    if config is None or not config.enabled or not prompt.visual or not prompt.query:
        return unreduced
    if config.evs_rate and prompt.visual % prompt.tokens_per_frame:
        return unreduced
    schedule = build_schedule(pattern, config)
    counts = schedule.keep_counts(entering_visual(prompt, config), config.min_keep)
    sizes = stage_sizes(len(pattern), schedule.boundaries)
    return [k for k, size in zip(counts, sizes, strict=True) for _ in range(size)]


def prefill_flops(dims: ModelDims, prompt: PromptTokens, config: ReductionConfig | None = None) -> Flops:
    """FLOPs of the whole prefill (unreduced when `config` is None)."""
    total = Flops(0.0, 0.0, 0.0)
    for kind, visual in zip(dims.pattern, visual_per_block(dims.pattern, prompt, config), strict=True):
        total = total + block_flops(dims, kind, prompt.text + visual)
    return total


def scoring_flops(dims: ModelDims, prompt: PromptTokens, config: ReductionConfig) -> float:
    """The reduction's scoring work in one reduced prefill (see the module docstring):
    the scoring blocks of every stage that ends with a drop. (The plugin also scores a
    stage without scoring blocks' predecessor for a later drop; the Nano pattern has
    scoring blocks in every stage.)"""
    from vllm_stateful_reduce.schedule import SCORING_KINDS

    per_block = visual_per_block(dims.pattern, prompt, config)
    if per_block[-1] == prompt.visual or config.selection != "scores":
        return 0.0
    boundaries = build_schedule(dims.pattern, config).boundaries
    edges = [-1, *boundaries, len(dims.pattern) - 1]
    total = 0.0
    for stage in range(len(boundaries)):
        blocks = range(edges[stage] + 1, edges[stage + 1] + 1)
        if per_block[edges[stage + 1] + 1] == per_block[edges[stage + 1]]:
            continue  # no drop after this stage
        for b in blocks:
            kind = SCORING_KINDS.get(dims.pattern[b])
            if kind is None or config.score_layers not in ("all", kind):
                continue
            k = per_block[b]
            if dims.pattern[b] == "M":
                total += 2 * prompt.query * k * dims.groups * dims.state
            else:
                total += 2 * prompt.query * (prompt.text + k) * dims.attention_heads * dims.head_dim
    return total


def reduction_ratio(dims: ModelDims, prompt: PromptTokens, config: ReductionConfig) -> dict[str, float]:
    """Unreduced / reduced FLOPs: the speedup a compute-bound prefill would get, in
    total and per part (linear, scan, attention core)."""
    full, reduced = prefill_flops(dims, prompt), prefill_flops(dims, prompt, config)
    return {
        "total": full.total / reduced.total,
        "linear": full.linear / reduced.linear,
        "scan": full.scan / reduced.scan if reduced.scan else math.nan,
        "attention": full.attention / reduced.attention if reduced.attention else math.nan,
        "attention_share_unreduced": full.attention / full.total,
    }


def with_vision_ratio(dims: ModelDims, vision: VisionDims, prompt: PromptTokens, config: ReductionConfig) -> float:
    """Unreduced / reduced FLOPs of vision tower + LLM prefill: what a compute-bound
    time to first token would gain (the tower's work is the same on both sides)."""
    tower = prompt.visual // prompt.tokens_per_frame * vision_flops_per_frame(vision)
    return (tower + prefill_flops(dims, prompt).total) / (tower + prefill_flops(dims, prompt, config).total)
