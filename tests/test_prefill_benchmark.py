"""The prefill FLOP model (benchmarks/flop_model.py) against PyTorch's FLOP counter on
transformers' NemotronH, its reduction ratios, and `benchmarks/prefill_speedup.py`
end to end at the smallest sizes."""

import json
import subprocess
import sys
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import NemotronHForCausalLM

from benchmarks.flop_model import (
    NANO_12B_V2,
    RADIO_H_512,
    ModelDims,
    PromptTokens,
    VisionDims,
    attention_core_flops,
    block_flops,
    prefill_flops,
    reduction_ratio,
    scan_flops,
    scoring_flops,
    vision_flops_per_frame,
    visual_per_block,
    with_vision_ratio,
)
from vllm_stateful_reduce.config import parse
from vllm_stateful_reduce.schedule import build_schedule
from vllm_stateful_reduce.testing.checkpoint import CheckpointSpec

from .helpers import REPO

TINY = CheckpointSpec(pattern="M*-M-M*-", chunk_size=16, seed=3)  # 2 of 8 Mamba heads per group, GQA 2:1


def counted_flops(spec: CheckpointSpec, tokens: int) -> dict[str, dict[str, int]]:
    """FlopCounterMode's per-module counts (module path -> op -> FLOPs) of one forward
    of transformers' NemotronH (pure PyTorch: eager attention, ssd_minimal scan)."""
    config = spec.text_config()
    config._attn_implementation = "eager"
    torch.manual_seed(spec.seed)
    model = NemotronHForCausalLM(config).float().eval()
    ids = torch.randint(9, spec.vocab_size, (1, tokens))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids, use_cache=False)
    return {name: {str(op): n for op, n in ops.items()} for name, ops in counter.get_flop_counts().items()}


def module_flops(counts: dict, suffix: str, op: str | None = None) -> int:
    """FLOPs of the module whose path ends with `suffix` (all ops, or one)."""
    (name,) = [n for n in counts if n.endswith(suffix)]
    return sum(n for o, n in counts[name].items() if op is None or o == op)


@pytest.mark.parametrize("tokens", [32, 100, 128])
def test_flop_model_matches_the_counter_on_transformers_nemotron_h(tokens: int) -> None:
    """Exact agreement, block by block, once three stated differences of the counted
    implementation are accounted for (all integers; tolerance 0):
    - conv1d: transformers pads K-1 on both sides and cuts, so it convolves L+K-1 rows;
    - attention: eager attention computes the full L x L (then masks), the model
      counts the causal half with the diagonal: full = model * 2L / (L+1);
    - scan: ssd_minimal computes C B^T per head (B, C repeated over a group's heads),
      pads L to whole chunks, and passes states between all pairs of chunks
      (2 (c+1)^2 H P N) where a sequential pass costs 2 c H P N.
    The counter sees matmuls, bmm and convolutions only (not norms or activations,
    which the model does not count either)."""
    dims = ModelDims.from_text_config(TINY.text_config())
    counts = counted_flops(TINY, tokens)
    k, c = dims.conv_kernel, dims.conv_channels
    for b, kind in enumerate(dims.pattern):
        layer = f".layers.{b}.mixer"
        model = block_flops(dims, kind, tokens)
        if kind == "M":
            mm = module_flops(counts, layer + ".in_proj") + module_flops(counts, layer + ".out_proj")
            conv = module_flops(counts, layer, "aten.convolution")
            assert conv == 2 * k * c * (tokens + k - 1)
            assert model.linear == mm + 2 * k * c * tokens
            chunks = -(-tokens // dims.chunk_size)
            hpn = dims.mamba_heads * dims.mamba_head_dim * dims.state
            per_head = scan_flops(replace(dims, groups=dims.mamba_heads), chunks * dims.chunk_size)
            expected = per_head - 2 * chunks * hpn + 2 * (chunks + 1) ** 2 * hpn
            assert module_flops(counts, layer, "aten.bmm") == expected
        elif kind == "*":
            linear = sum(module_flops(counts, f"{layer}.{p}_proj") for p in "qkvo")
            assert model.linear == linear
            full = module_flops(counts, layer, "aten.bmm")
            assert full * (tokens + 1) == model.attention * 2 * tokens
        else:
            assert model.linear == module_flops(counts, layer)
    # nothing else in the stack (the LM head is not part of the model: vLLM computes
    # logits for the last prompt row only)
    stack = module_flops(counts, "NemotronHForCausalLM") - module_flops(counts, "lm_head")
    assert stack == sum(module_flops(counts, f".layers.{b}.mixer") for b in range(len(dims.pattern)))


def test_flop_model_dims_of_a_built_checkpoint(tmp_path: Path) -> None:
    from vllm_stateful_reduce.testing.checkpoint import build_checkpoint, export_language_model

    checkpoint = build_checkpoint(tmp_path / "vl", TINY)
    dims = ModelDims.from_checkpoint(checkpoint)
    assert dims == ModelDims.from_text_config(TINY.text_config())
    assert ModelDims.from_checkpoint(export_language_model(checkpoint, tmp_path / "text")) == dims
    assert (dims.pattern, dims.mamba_inner, dims.conv_channels) == (TINY.pattern, 128, 128 + 2 * 2 * 16)


NANO_PROMPT = PromptTokens(visual=32 * 256, text=32 * 13 + 40, query=30)


@pytest.mark.parametrize(
    "dims",
    [
        NANO_12B_V2,
        replace(
            NANO_12B_V2,
            hidden=320,
            attention_heads=10,
            kv_heads=2,
            head_dim=32,
            mamba_heads=20,
            mamba_head_dim=32,
            state=64,
            groups=4,
            ffn=1280,
        ),
    ],
    ids=["12b", "small"],
)
def test_ratio_is_one_without_reduction_and_grows_as_the_budget_shrinks(dims: ModelDims) -> None:
    assert reduction_ratio(dims, NANO_PROMPT, parse({"budget": 1.0}))["total"] == 1.0
    assert reduction_ratio(dims, NANO_PROMPT, parse({"enabled": False}))["total"] == 1.0
    no_query = replace(NANO_PROMPT, query=0)  # the plugin serves it unreduced
    assert reduction_ratio(dims, no_query, parse({"budget": 0.25}))["total"] == 1.0
    ratios = [reduction_ratio(dims, NANO_PROMPT, parse({"budget": b}))["total"] for b in (0.75, 0.5, 0.35, 0.25)]
    assert all(a < b for a, b in pairwise(ratios)), ratios
    # the quadratic attention core gains more than the rows do
    at_25 = reduction_ratio(dims, NANO_PROMPT, parse({"budget": 0.25}))
    assert at_25["attention"] > at_25["linear"] > 1


def test_linear_ratio_is_the_token_cap_when_every_block_costs_the_same() -> None:
    """MLP blocks only (no attention, no scan): the ratio is exactly the rows'
    ratio n (V + T) / sum_b L_b, which the depth-averaged budget b puts at
    (V + T) / (bV + T) up to the schedule's rounding (half a token per block)."""
    dims = replace(NANO_12B_V2, pattern="-" * 24)
    prompt = PromptTokens(visual=4096, text=211, query=25)
    config = parse({"budget": 0.25, "boundaries": [3, 7, 11, 15, 19]})
    ratio = reduction_ratio(dims, prompt, config)
    schedule = build_schedule(dims.pattern, config)
    kept = schedule.depth_average(schedule.keep_counts(prompt.visual, config.min_keep), len(dims.pattern))
    assert (
        ratio["total"]
        == ratio["linear"]
        == pytest.approx((prompt.visual + prompt.text) / (kept + prompt.text), rel=1e-12)
    )
    assert ratio["linear"] == pytest.approx((4096 + 211) / (0.25 * 4096 + 211), rel=1e-3)
    # with the real layout, blocks differ in cost by kind: still within 2% of the cap
    nano = reduction_ratio(NANO_12B_V2, NANO_PROMPT, parse({"budget": 0.25}))["linear"]
    cap = (NANO_PROMPT.visual + NANO_PROMPT.text) / (0.25 * NANO_PROMPT.visual + NANO_PROMPT.text)
    assert nano == pytest.approx(cap, rel=0.02)


def test_evs_alone_keeps_vllms_count_in_every_block() -> None:
    from vllm.multimodal.video_prune.evs import compute_retained_tokens_count

    prompt = NANO_PROMPT
    config = parse({"evs_rate": 0.65, "budget": 1.0})
    kept = compute_retained_tokens_count(256, prompt.visual // 256, 0.65)
    assert visual_per_block(NANO_12B_V2.pattern, prompt, config) == [kept] * len(NANO_12B_V2.pattern)
    ratio = reduction_ratio(NANO_12B_V2, prompt, config)
    assert ratio["linear"] == pytest.approx((prompt.visual + prompt.text) / (kept + prompt.text), rel=1e-12)
    # EVS then ours compounds: more than either alone (less than their product: text stays)
    both = reduction_ratio(NANO_12B_V2, prompt, parse({"evs_rate": 0.5, "budget": 0.25}))["total"]
    ours = reduction_ratio(NANO_12B_V2, prompt, parse({"budget": 0.25}))["total"]
    evs = reduction_ratio(NANO_12B_V2, prompt, parse({"evs_rate": 0.5, "budget": 1.0}))["total"]
    assert max(ours, evs) < both < ours * evs


def test_attention_core_counts_causal_pairs() -> None:
    dims = NANO_12B_V2
    one_row = 2 * 2 * dims.attention_heads * dims.head_dim  # QK and PV for one key: 2 FLOPs x d_h, twice
    assert attention_core_flops(dims, 1) == one_row
    assert attention_core_flops(dims, 3) == one_row * (1 + 2 + 3)
    assert prefill_flops(dims, PromptTokens(0, 10, 5)).attention == 6 * attention_core_flops(dims, 10)


@pytest.mark.engine
def test_quick_run_end_to_end(tmp_path: Path) -> None:
    """The script at its smallest (two engines, ~2 min): every configuration measured,
    the summary complete and sane."""
    out_json, out_png = tmp_path / "prefill.json", tmp_path / "prefill.png"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "prefill_speedup.py"), "--quick", "--lengths", "1024", "--reps", "1",
         "--decode-length", "512", "--decode-tokens", "4", "--batch-length", "512", "--batch-size", "2",
         "--tax-length", "512", "--json", str(out_json), "--png", str(out_png)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert out_png.stat().st_size > 10_000
    report = json.loads(out_json.read_text())
    s = report["summary"]
    keys = (
        "speedup_at_25",
        "visual_tokens",
        "theoretical_ratio_at_25",
        "efficiency_at_25",
        "efficiency_at_25_forward",
        "overhead_fraction",
        "evs_ours_speedup",
        "decode_ratio",
        "plugin_tax",
    )
    assert all(s[k] is not None for k in keys), s
    assert s["visual_tokens"] == 1024
    configs = report["prefill"]["1024"]["configs"]
    assert set(configs) == {"off", "ours_50", "ours_35", "ours_25", "evs_50", "evs_35", "evs_25", "evs50_ours25"}
    assert s["speedup_at_25"] > 1.3 and s["evs_ours_speedup"] > s["speedup_at_25"], s
    assert 2.5 < s["theoretical_ratio_at_25"] < 4.5 and 0.2 < s["efficiency_at_25"] < 1.5, s
    assert 0.0 < s["overhead_fraction"] < 0.5 and 0.3 < s["decode_ratio"] < 3.0 and -0.5 < s["plugin_tax"] < 0.5, s
    at = s["by_length"]["1024"]
    assert at["overhead_fraction"] == s["overhead_fraction"] and at["efficiency"] == s["efficiency_at_25"], at
    # the fixed-time model lies between the LM's FLOP ratio and 1, so against it TTFT looks more efficient
    assert at["efficiency_ttft_model"] > at["efficiency"], at
    # a perfect reduction still pays off's time outside the LM: below 1, and by exactly that
    assert 0.3 < at["efficiency_ceiling"] < 1.0, at
    assert at["efficiency_ceiling"] * at["efficiency_ttft_model"] == pytest.approx(at["efficiency"], rel=1e-9), at
    # scoring is a sliver of the reduced prefill's FLOPs, relatively ~4x less at 12B's widths
    assert 0 < at["scoring_flop_share_12b"] < at["scoring_flop_share"] < 0.05, at
    assert 1 < s["theoretical_ratio_at_25_12b_with_vision"] < configs["ours_25"]["flop_ratio_12b"]["total"], s
    assert report["batch"]["all_prefilled_in_one_step"], report["batch"]
    assert "off" in run.stdout and "plugin tax" in run.stdout  # the terminal table


def test_vision_flop_model_matches_the_counter_on_the_reference_tower(tmp_path: Path) -> None:
    """The tower's FLOPs per frame against FlopCounterMode on the oracle's RADIO ViT +
    projector (matmuls, linears and SDPA; exact), and the 12B tower's share of a frame."""
    from vllm_stateful_reduce.testing.checkpoint import build_checkpoint
    from vllm_stateful_reduce.testing.oracle import ReferenceNanoVL

    checkpoint = build_checkpoint(tmp_path / "vl", TINY)
    vision = VisionDims.from_checkpoint(checkpoint)
    reference = ReferenceNanoVL(checkpoint)
    frames = torch.randn(3, 3, TINY.image_size, TINY.image_size)
    # the math SDPA (two bmm the counter sees; it has no formula for the CPU flash kernel)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        reference.vision_embeddings(frames)
    assert vision.prefix_tokens == reference.vit["model.patch_generator.cls_token.token"].shape[0]
    assert counter.get_total_flops() == 3 * vision_flops_per_frame(vision)
    # the real tower is ~1/5 of an unreduced frame's work: it caps what the LLM's reduction
    # can do for the time to first token (3.6x on the LLM, ~2.4x with the tower)
    prompt = PromptTokens(visual=64 * 256, text=64 * 13 + 40, query=30)
    frame_share = (
        vision_flops_per_frame(RADIO_H_512)
        * 64
        / (vision_flops_per_frame(RADIO_H_512) * 64 + prefill_flops(NANO_12B_V2, prompt).total)
    )
    assert 0.15 < frame_share < 0.25, frame_share
    config = parse({"budget": 0.25})
    lm = reduction_ratio(NANO_12B_V2, prompt, config)["total"]
    end_to_end = 1 / (frame_share + (1 - frame_share) / lm)
    assert with_vision_ratio(NANO_12B_V2, RADIO_H_512, prompt, config) == pytest.approx(end_to_end)
    print(f"12B tower share {frame_share:.3f}; LLM {lm:.2f}x, with the tower {end_to_end:.2f}x")


def test_scoring_flops_follow_the_schedule() -> None:
    """Scoring work: the scoring blocks of stages that end with a drop, at their widths."""
    config = parse({"budget": 0.25})
    prompt = NANO_PROMPT
    per_block = visual_per_block(NANO_12B_V2.pattern, prompt, config)
    d = NANO_12B_V2
    expected = 0.0
    for b, kind in enumerate(d.pattern[:-8]):  # the last stage (8 blocks) drops nothing after it
        k = per_block[b]
        if kind == "M":
            expected += 2 * prompt.query * k * d.groups * d.state
        elif kind == "*":
            expected += 2 * prompt.query * (prompt.text + k) * d.attention_heads * d.head_dim
    assert scoring_flops(d, prompt, config) == expected > 0
    assert scoring_flops(d, prompt, parse({"budget": 0.25, "score_layers": "attention"})) < expected
    assert scoring_flops(d, prompt, parse({"evs_rate": 0.5, "budget": 1.0})) == 0.0
    assert scoring_flops(d, prompt, parse({"budget": 0.25, "selection": "random"})) == 0.0
    # small next to the reduced prefill at 12B, ~4x more so at the benchmark's narrow layout
    share = scoring_flops(d, prompt, config) / prefill_flops(d, prompt, config).total
    assert share < 0.002, share
