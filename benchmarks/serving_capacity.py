"""Serving capacity: how many long-video requests fit in the KV cache at once when each
reduction stage's attention layers hold only the tokens they keep (`free_dropped_kv`).

    python benchmarks/serving_capacity.py [--sizes 4096 8192 ...] [--kv-gib 40] --json out.json \
        [--png out.png] [--quick] [--skip-e2e]

Part A, simulation of vLLM 0.32's real allocator (no worker, no model): vLLM's
`Scheduler` (plain arms) or the plugin's `StageScheduler` (stage arms) over vLLM's own
`KVCacheManager`, with KV-cache groups made by vLLM's `get_kv_cache_groups` /
`get_kv_cache_config_from_groups` from synthetic per-layer specs in the geometry of
Nemotron Nano 12B v2 VL: pattern `M-M-M-M*-` x 6 + `M-M-M-M-` (28 Mamba2, 28 MLP, 6
attention), attention 8 KV heads x 128 bf16, Mamba2 128 heads x 80 x state 128 (fp32
SSM state), 8 groups, conv kernel 4 (conv state (12288, 3) bf16). The block size
follows vLLM's hybrid alignment (docs/design/kv-memory.md 1d:
`attn_block = 16 * cdiv(mamba_page, 16 * attn_page_1tok)`) = 1312 tokens, and Mamba
pages are padded to that attention page P (5,373,952 B). Every arm has the same byte
budget (`--kv-gib`, default 40 GiB). Prompts: V visual tokens of 512 px frames (256 per
frame), 10 text tokens per frame (separators, timestamps), 64 of question and template;
`--max-tokens` (128) decode tokens each. Arms:

  off                    FullAttentionSpec (today's path); every attention layer holds the whole prompt
  stage_specs_no_drops   StageFullAttentionSpec(stage=j), no drops: the grouping alone
  ours_25                stage specs; stage j drops V - keep_j (sigmoid schedule, budget 0.25, min_keep 16)
  evs_75                 EVS at rate 0.75 before the LLM (vLLM's retained count): a shorter prompt, plain specs
  evs_75_ours_25         EVS, then ours on the visual tokens EVS kept, stage specs

Stage j of an attention block = number of reduction boundaries before it (boundaries:
every attention block but the model's last block, `schedule.boundary_blocks`), so the six
attention layers are in stages 0..5 and stage 0's holds the whole prompt.

  fit     N identical requests submitted at once (N above what the closed form admits);
          scheduling steps (schedule() + update_from_output() with one sampled token per
          scheduled request) until the first request finishes; the peak of
          len(scheduler.running) is "requests that fit at once". max_num_batched_tokens =
          max_model_len (whole prompts, chunked prefill and prefix caching off).
  stream  32k-visual requests arriving at seeded Poisson times (mean interval
          `--stream-interval` steps, the same arrival list for every arm) over a fixed number
          of steps: preemptions, mean / peak running, finished, mean steps from arrival to
          first schedule. Time here is scheduler steps, not seconds. The default load, one
          arrival per 2 steps of ~129-step requests (~64 in flight), lies between what the
          closed form lets off (41) and ours_25 (98) hold at 40 GiB.

vLLM admits a waiting request only when its whole prompt fits (scheduler_reserve_full_isl),
so these identical requests are preempted only when a decode step needs a new block and
the pool is full; the fit peak can include such requests (the tables mark it).

What theory predicts (printed beside every measurement): a request holds, per KV-cache
group, cdiv(rows, block_size) blocks of an attention group (rows = its tokens minus the
stage's drops) and one block per Mamba group; every block is G·P bytes (G = layers per
group). The pool has num_blocks - 1 usable blocks (vLLM keeps one null block), so

  fit = floor((num_blocks - 1) / blocks_per_request(prompt))          (vLLM admits on the prompt)

and the requests that also fit through their last decode token use prompt + max_tokens - 1.
Per request: off = (6 cdiv(L, 1312) + 30) P (one group of the 6 attention layers, 5 Mamba
groups of 6 with 2 padding layers); stage arms = (sum_j cdiv(L - d_j, 1312) + 28) P. The
Mamba state (28 P ~ 150 MB) does not shrink with reduction, so the ratio grows with the
video: attention is ~6 x 4 KiB per token per request, a minority below ~6k tokens.
Block granularity (1312 tokens) makes it a staircase.

Part B, end to end on this CPU with the real engine: vLLM's offline `LLM` on
models/video-qa-long (13 blocks `M*-M-M*-M-M*-`, float32, reduction at its default 25%
budget), `stateful_reduce.free_dropped_kv` false vs true with the same
`kv_cache_memory_bytes`, sized by the same closed form so that the false arm holds
`--e2e-off-fit` (10; quick 4) requests through their last token (at 4 the integer floor
of the true arm's 5.8 makes it 5, a 1.25x that says more about rounding than memory).
16 (quick) or 24 concurrent random
64-frame videos (1,024 visual tokens, 1,974-token prompts), max_tokens 32, greedy,
ignore_eos. In-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0) whose scheduler's
`schedule` is wrapped to record len(running) each step: peak / mean running (beside the
closed form on the engine's own KV-cache config), preemptions (vllm:num_preemptions),
scheduler steps and wall time to drain the batch, and whether the generated token ids
are identical between the arms. The arms alternate, order flipped every one of
`--e2e-reps` reps, each a fresh engine that first serves a small warm-up batch. Both arms
compute the same tokens; the true arm takes fewer steps (more requests per decode step),
which shortens the drain as far as a step's cost does not grow with its batch. Wall time
depends on the machine's load (steps do not): the ratio is of each arm's fastest run,
with every run's time beside it. No checkpoint with the real 62-block pattern exists
under models/ (artifacts/prefill-speedup-* has it, random weights, 512 px frames: too
slow for a 20-request CPU run), so the real pattern is checked in part A only.

JSON "summary": sim_ratio_at_8k / sim_ratio_at_32k (requests that fit: peak running,
ours_25 / off), sim_sustained_ratio_at_* (running when the first request finished),
theory_ratio_at_*, sim_ratios / theory_ratios (every arm and size), block_size (1312),
stream figures, e2e_peak_running_ratio (true / false arm), e2e_outputs_identical,
e2e_drain_time_ratio (false / true, each arm's fastest run; _median: of the reps' ratios)
and e2e_drain_steps_ratio.
"""

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.flop_model import NANO_12B_V2, ModelDims  # noqa: E402

FRAME_TOKENS = 256  # 512 px frames, patch 16, pixel shuffle 0.5
FRAME_TEXT = 10  # text tokens per frame (separator, timestamp)
QUESTION_TOKENS = 64  # question and chat template
BUDGET, EVS_RATE, MIN_KEEP = 0.25, 0.75, 16
SIM_MAX_MODEL_LEN = 73728  # 72k: the longest prompt (64k visual + text) and its decode
STREAM_VISUAL = 32768
LONG_MODEL = ROOT / "models" / "video-qa-long"
E2E_FRAMES = 64  # 128 px frames, 16 visual tokens each: 1,024 visual tokens (the model's task length)
E2E_QUESTION = "What colour is the circle?"
E2E_MAX_TOKENS = 32

FULL = {"sizes": [4096, 8192, 16384, 32768, 65536], "max_tokens": 128, "stream_steps": 1200, "stream_interval": 2.0,
        "e2e_requests": 24, "e2e_reps": 3, "e2e_off_fit": 10}  # fmt: skip
QUICK = {"sizes": [8192, 32768], "max_tokens": 128, "stream_steps": 300, "stream_interval": 2.0,
         "e2e_requests": 16, "e2e_reps": 1, "e2e_off_fit": 4}  # fmt: skip


@dataclass(frozen=True)
class Arm:
    stage_specs: bool  # StageFullAttentionSpec per stage (StageScheduler) or plain FullAttentionSpec
    evs: bool  # EVS shortens the prompt before the LLM
    ours: bool  # stage drops from the schedule


ARMS = {
    "off": Arm(stage_specs=False, evs=False, ours=False),
    "stage_specs_no_drops": Arm(stage_specs=True, evs=False, ours=False),
    "ours_25": Arm(stage_specs=True, evs=False, ours=True),
    "evs_75": Arm(stage_specs=False, evs=True, ours=False),
    "evs_75_ours_25": Arm(stage_specs=True, evs=True, ours=True),
}


@dataclass(frozen=True)
class Geometry:
    """What the KV-cache specs of a NemotronH language model depend on."""

    dims: ModelDims
    dtype: str  # model and KV-cache dtype (the Mamba conv state follows it)
    ssm_dtype: str  # Mamba SSM state
    kernel_block: int  # max(the attention backend's smallest kernel block, --block-size)


# Nano 12B v2 VL on a GPU: bf16, fp32 SSM state, FlashAttention MultipleOf(16), --block-size 16
NANO_12B = Geometry(NANO_12B_V2, "bfloat16", "float32", 16)
# the committed checkpoints on this CPU: float32, CPU attention MultipleOf(32), --block-size 128
CPU_KERNEL_BLOCK = 128


def log(started: float, message: str) -> None:
    print(f"{message}  [{time.monotonic() - started:.0f} s]", flush=True)


# ------------------------------------------------------------------ KV-cache specs


def attention_spec_kwargs(geo: Geometry, block_size: int) -> dict:
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    d = geo.dims
    return {
        "block_size": block_size,
        "num_kv_heads": d.kv_heads,
        "head_size": d.head_dim,
        "dtype": STR_DTYPE_TO_TORCH_DTYPE[geo.dtype],
    }


def mamba_state(geo: Geometry):
    """(shapes, dtypes) of one Mamba2 layer's state, by vLLM's own calculators (TP 1)."""
    from vllm.model_executor.layers.mamba.mamba_utils import MambaStateDtypeCalculator, MambaStateShapeCalculator
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    d = geo.dims
    shapes = MambaStateShapeCalculator.mamba2_state_shape(
        tp_world_size=1,
        intermediate_size=d.mamba_inner,
        n_groups=d.groups,
        num_heads=d.mamba_heads,
        head_dim=d.mamba_head_dim,
        state_size=d.state,
        conv_kernel=d.conv_kernel,
    )
    dtypes = MambaStateDtypeCalculator.mamba2_state_dtype(STR_DTYPE_TO_TORCH_DTYPE[geo.dtype], "auto", geo.ssm_dtype)
    return shapes, dtypes


def hybrid_block_size(geo: Geometry) -> dict:
    """vLLM's hybrid alignment (`Platform._align_hybrid_block_size`, memo 1d): the
    smallest multiple of the kernel block whose attention page holds one Mamba state;
    Mamba pages are padded to that page."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec

    shapes, dtypes = mamba_state(geo)
    attn_1tok = FullAttentionSpec(**attention_spec_kwargs(geo, 1)).page_size_bytes
    mamba_page = MambaSpec(shapes=shapes, dtypes=dtypes, block_size=-1).page_size_bytes
    block_size = geo.kernel_block * -(-mamba_page // (geo.kernel_block * attn_1tok))
    page = block_size * attn_1tok
    return {
        "attention_page_per_token": attn_1tok,
        "mamba_page": mamba_page,
        "mamba_shapes": [list(s) for s in shapes],
        "mamba_dtypes": [str(t) for t in dtypes],
        "block_size": block_size,
        "page_bytes": page,
        "mamba_padding_percent": 100 * (page - mamba_page) / mamba_page,
    }


def attention_stages(pattern: str) -> dict[int, int]:
    """Attention block index -> its reduction stage (boundaries before it), as the
    plugin's model declares them (reduced_stack._declare_kv_stages)."""
    from vllm_stateful_reduce.config import ReductionConfig
    from vllm_stateful_reduce.schedule import boundary_blocks, stage_of

    boundaries = boundary_blocks(pattern, ReductionConfig())
    return {b: stage_of(b, boundaries) for b, kind in enumerate(pattern) if kind == "*"}


def layer_specs(geo: Geometry, stage_specs: bool, block: dict, max_model_len: int) -> dict:
    """Per layer, in model order, the spec the runner would report: MambaSpec (padded
    to the attention page) for 'M', FullAttentionSpec or StageFullAttentionSpec(stage=j)
    for '*'."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec

    from vllm_stateful_reduce.adapter.kv_stages import StageFullAttentionSpec

    shapes, dtypes = mamba_state(geo)
    stages = attention_stages(geo.dims.pattern)
    specs = {}
    for b, kind in enumerate(geo.dims.pattern):
        prefix = f"language_model.model.layers.{b}.mixer"
        if kind == "M":
            specs[prefix] = MambaSpec(
                block_size=max_model_len, shapes=shapes, dtypes=dtypes, page_size_padded=block["page_bytes"]
            )
        elif kind == "*":
            kwargs = attention_spec_kwargs(geo, block["block_size"])
            specs[prefix + ".attn"] = (
                StageFullAttentionSpec(**kwargs, stage=stages[b]) if stage_specs else FullAttentionSpec(**kwargs)
            )
    return specs


def write_model_dir(directory: Path, max_model_len: int) -> Path:
    """A tiny NemotronH config.json: vLLM's ModelConfig needs a local model (no weights
    are read; the KV specs are synthetic, only max_model_len matters)."""
    from transformers import NemotronHConfig

    NemotronHConfig(
        architectures=["NemotronHForCausalLM"],
        hybrid_override_pattern="M*-",
        vocab_size=256,
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        intermediate_size=64,
        mamba_num_heads=4,
        mamba_head_dim=16,
        ssm_state_size=16,
        n_groups=1,
        chunk_size=64,
        max_position_embeddings=max_model_len,
        mamba_ssm_cache_dtype="float32",
    ).save_pretrained(directory)
    return directory


def make_vllm_config(model_dir: Path, max_model_len: int, block_size: int, max_num_seqs: int = 1024):
    """Chunked prefill and prefix caching off (the plugin's REQUIRED_ENGINE_ARGS), whole
    prompts of up to max_model_len tokens per step."""
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig

    vc = VllmConfig(
        model_config=ModelConfig(
            model=str(model_dir), skip_tokenizer_init=True, max_model_len=max_model_len, dtype="bfloat16"
        ),
        scheduler_config=SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_model_len,
            max_model_len=max_model_len,
            enable_chunked_prefill=False,
            is_encoder_decoder=False,
            async_scheduling=False,
        ),
        cache_config=CacheConfig(block_size=block_size, enable_prefix_caching=False),
    )
    vc.cache_config.kv_cache_layout = "LBNHC"  # resolved by the engine core in serving
    vc.scheduler_config.disable_hybrid_kv_cache_manager = False
    return vc


def kv_cache_config(vc, specs: dict, budget_bytes: int):
    """vLLM's grouping and sizing of `specs` under `budget_bytes`."""
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups, get_kv_cache_groups

    return get_kv_cache_config_from_groups(vc, get_kv_cache_groups(vc, specs), budget_bytes)


def bytes_per_block(kv_cfg) -> int:
    """G·P: the largest group's pages (the groups alias one buffer of num_blocks blocks)."""
    return max(len(g.layer_names) * g.kv_cache_spec.page_size_bytes for g in kv_cfg.kv_cache_groups)


def describe_groups(kv_cfg) -> dict:
    from vllm.v1.kv_cache_interface import MambaSpec

    groups = kv_cfg.kv_cache_groups
    attention = [g for g in groups if not isinstance(g.kv_cache_spec, MambaSpec)]
    return {
        "groups": len(groups),
        "attention_groups": len(attention),
        "layers_per_group": max(len(g.layer_names) for g in groups),
        "mamba_group_sizes": [len(g.layer_names) for g in groups if isinstance(g.kv_cache_spec, MambaSpec)],
        "attention_group_stages": [getattr(g.kv_cache_spec, "stage", None) for g in attention],
        "block_sizes": sorted({g.kv_cache_spec.block_size for g in attention}),
        "num_blocks": kv_cfg.num_blocks,
        "bytes_per_block": bytes_per_block(kv_cfg),
    }


# ------------------------------------------------------------------ prompts and theory


@dataclass(frozen=True)
class Prompt:
    visual: int  # visual tokens of the video (before EVS)
    entering: int  # visual tokens in the prompt (after EVS)
    length: int  # prompt tokens
    drops: tuple[int, ...]  # per stage (stage 0: 0); () when unreduced


def make_prompt(visual: int, arm: Arm) -> Prompt:
    """The prompt of a `visual`-token video under `arm`, and the drops the plugin's
    scheduler predicts for it (the schedule's keep counts of the tokens entering the LLM;
    EVS by vLLM's retained count, the frames' text stays)."""
    from vllm_stateful_reduce.config import ReductionConfig
    from vllm_stateful_reduce.schedule import build_schedule

    frames = visual // FRAME_TOKENS
    entering = visual
    if arm.evs:
        from vllm.multimodal.video_prune.evs import compute_retained_tokens_count

        entering = compute_retained_tokens_count(FRAME_TOKENS, frames, EVS_RATE)
    length = entering + frames * FRAME_TEXT + QUESTION_TOKENS
    drops: tuple[int, ...] = ()
    if arm.ours:
        config = ReductionConfig(budget=BUDGET, min_keep=MIN_KEEP)
        keep = build_schedule(NANO_12B_V2.pattern, config).keep_counts(entering, config.min_keep)
        drops = tuple(entering - k for k in keep)
    return Prompt(visual, entering, length, drops)


def blocks_per_request(kv_cfg, tokens: int, drops: tuple[int, ...]) -> int:
    """Blocks a request of `tokens` tokens holds (closed form, group by group): one per
    Mamba group (mamba_cache_mode "none"), cdiv(rows, block_size) per attention group,
    rows = tokens minus the group's stage's drops."""
    from vllm.v1.kv_cache_interface import MambaSpec

    total = 0
    for group in kv_cfg.kv_cache_groups:
        spec = group.kv_cache_spec
        if isinstance(spec, MambaSpec):
            total += 1
        else:
            dropped = drops[spec.stage] if drops and hasattr(spec, "stage") else 0
            total += -(-(tokens - dropped) // spec.block_size)
    return total


def theory(kv_cfg, prompt_length: int, drops: tuple[int, ...], max_tokens: int, page_bytes: int) -> dict:
    """Requests that fit by the closed form: at admission (vLLM admits on the prompt) and
    through their last decode token. The pool's null block is not usable."""
    usable = kv_cfg.num_blocks - 1
    at_admission = blocks_per_request(kv_cfg, prompt_length, drops)
    at_end = blocks_per_request(kv_cfg, prompt_length + max_tokens - 1, drops)
    per_block = bytes_per_block(kv_cfg)
    return {
        "blocks_per_request": at_admission,
        "blocks_per_request_at_end": at_end,
        "pages_per_request": at_admission * per_block // page_bytes,
        "bytes_per_request": at_admission * per_block,
        "fit": usable // at_admission,
        "fit_through_decode": usable // at_end,
    }


# ------------------------------------------------------------------ part A: the real scheduler


def make_scheduler(vc, kv_cfg, stage: bool):
    """vLLM's Scheduler, or the plugin's StageScheduler (its stage managers bound to its
    DropBook), over vLLM's KVCacheManager for `kv_cfg`."""
    from vllm.v1.core.kv_cache_utils import resolve_kv_cache_block_sizes
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_stateful_reduce.adapter.kv_stages import StageScheduler

    vc.cache_config.num_gpu_blocks = kv_cfg.num_blocks
    sched_bs, hash_bs = resolve_kv_cache_block_sizes(kv_cfg, vc)
    return (StageScheduler if stage else Scheduler)(
        vllm_config=vc,
        kv_cache_config=kv_cfg,
        structured_output_manager=StructuredOutputManager(vc),
        block_size=sched_bs,
        hash_block_size=hash_bs,
        log_stats=False,
    )


def submit(scheduler, req_id: str, prompt: Prompt, max_tokens: int) -> None:
    """A text-only request of the prompt's length. Its drops go straight into the
    scheduler's DropBook (in serving, the engine core predicts them from the video's
    positions; these requests have none), which its stage managers then apply."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    request = Request(req_id, [100 + i % 1000 for i in range(prompt.length)], params, None)
    if any(prompt.drops):
        scheduler.kv_drops.predicted[req_id] = prompt.drops
    scheduler.add_request(request)


def step(scheduler):
    """One scheduling step with one sampled token per scheduled request (every prefill
    is whole: chunked prefill is off). Returns (scheduler_output, finished ids)."""
    from vllm.v1.outputs import ModelRunnerOutput

    out = scheduler.schedule()
    ids = list(out.num_scheduled_tokens)
    result = ModelRunnerOutput(
        req_ids=ids, req_id_to_index={q: i for i, q in enumerate(ids)}, sampled_token_ids=[[7] for _ in ids]
    )
    engine_outputs = scheduler.update_from_output(out, result)
    finished = [o.request_id for eo in engine_outputs.values() for o in eo.outputs if o.finish_reason is not None]
    return out, finished


def measure_fit(vc, kv_cfg, arm: Arm, prompt: Prompt, max_tokens: int, expected: int) -> dict:
    """N identical requests submitted at once (N above the closed form's count), stepped
    until the first finishes (until then nothing frees blocks): the peak number running,
    and how many were still running when the first finished (preemptions in between)."""
    scheduler = make_scheduler(vc, kv_cfg, arm.stage_specs)
    n = int(1.25 * expected) + 4
    for i in range(n):
        submit(scheduler, f"r{i}", prompt, max_tokens)
    peak, preempted, steps, finished = 0, 0, 0, []
    while scheduler.has_requests() and not finished:
        out, finished = step(scheduler)
        steps += 1
        peak = max(peak, len(scheduler.running) + len(finished))
        preempted += len(out.preempted_req_ids)
    return {
        "submitted": n,
        "peak_running": peak,
        "running_at_first_finish": len(scheduler.running) + len(finished),
        "saturated": peak >= n,
        "preemptions": preempted,
        "steps": steps,
    }


def arrival_steps(mean_interval: float, steps: int, seed: int = 0) -> list[int]:
    """Seeded Poisson arrivals (exponential gaps) as step indices below `steps`."""
    rng, t, out = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(1.0 / mean_interval)
        if t >= steps:
            return out
        out.append(int(t))


def measure_stream(vc, kv_cfg, arm: Arm, prompt: Prompt, max_tokens: int, arrivals: list[int], steps: int) -> dict:
    """The arrival list served for `steps` scheduling steps."""
    scheduler = make_scheduler(vc, kv_cfg, arm.stage_specs)
    arrived_at: dict[str, int] = {}
    first_scheduled: dict[str, int] = {}
    running, waiting = [], []
    preemptions, finished, nxt = 0, 0, 0
    for t in range(steps):
        while nxt < len(arrivals) and arrivals[nxt] <= t:
            arrived_at[f"s{nxt}"] = t
            submit(scheduler, f"s{nxt}", prompt, max_tokens)
            nxt += 1
        out, done = step(scheduler)
        for req_id in out.num_scheduled_tokens:
            first_scheduled.setdefault(req_id, t)
        preemptions += len(out.preempted_req_ids)
        finished += len(done)
        running.append(len(scheduler.running) + len(done))
        waiting.append(len(scheduler.waiting))
    waits = [first_scheduled[r] - arrived_at[r] for r in first_scheduled]
    return {
        "arrived": nxt,
        "finished": finished,
        "preemptions": preemptions,
        "mean_running": sum(running) / steps,
        "peak_running": max(running),
        "mean_waiting": sum(waiting) / steps,
        "never_scheduled": nxt - len(first_scheduled),
        "mean_steps_to_first_schedule": sum(waits) / len(waits) if waits else None,
        "running_per_step": running,
    }


def quiet_drop_predictor():
    """The plugin warns at every StageScheduler made without a tokenizer ("every
    request gets KV blocks for all its tokens"): here the drops are given directly."""
    import logging

    logger = logging.getLogger("vllm_stateful_reduce.adapter.kv_stages")
    level = logger.level
    logger.setLevel(logging.ERROR)
    return lambda: logger.setLevel(level)


def simulate(sizes: dict, kv_gib: float, started: float) -> dict:
    """Part A: every arm at every size (fit), then the arrival stream, under one byte budget."""
    from vllm_stateful_reduce.adapter.kv_stages import register_stage_spec

    register_stage_spec()  # after vLLM's own specs (memo section 2)
    restore = quiet_drop_predictor()
    block = hybrid_block_size(NANO_12B)
    log(
        started,
        f"Nano 12B v2 hybrid block size: {block['block_size']} tokens (attention page {block['page_bytes']} B = "
        f"{block['attention_page_per_token']} B/token; Mamba state {block['mamba_page']} B padded "
        f"{block['mamba_padding_percent']:.2f}%)",
    )
    prompts = {arm: {v: make_prompt(v, a) for v in [*sizes["sizes"], STREAM_VISUAL]} for arm, a in ARMS.items()}
    longest = max(p.length for by_size in prompts.values() for p in by_size.values()) + sizes["max_tokens"]
    max_model_len = max(SIM_MAX_MODEL_LEN, 16 * -(-longest // 16))
    budget = int(kv_gib * 2**30)
    with tempfile.TemporaryDirectory(prefix="vsr-capacity-") as tmp:
        vc = make_vllm_config(write_model_dir(Path(tmp), max_model_len), max_model_len, block["block_size"])
        configs = {
            name: kv_cache_config(vc, layer_specs(NANO_12B, arm.stage_specs, block, max_model_len), budget)
            for name, arm in ARMS.items()
        }
        groups = {name: describe_groups(cfg) for name, cfg in configs.items()}
        for name, g in groups.items():
            mamba = g["mamba_group_sizes"]
            log(
                started,
                f"{name:<21} {g['groups']} KV-cache groups ({g['attention_groups']} attention; {len(mamba)} Mamba of "
                f"{sorted(set(mamba))} layers), {g['layers_per_group']} layers/group, {g['num_blocks']} blocks of "
                f"{g['bytes_per_block'] / 2**20:.1f} MiB in {kv_gib:g} GiB",
            )
        fit = {str(v): {} for v in sizes["sizes"]}
        for visual in sizes["sizes"]:
            for name, arm in ARMS.items():
                prompt = prompts[name][visual]
                th = theory(configs[name], prompt.length, prompt.drops, sizes["max_tokens"], block["page_bytes"])
                m = measure_fit(vc, configs[name], arm, prompt, sizes["max_tokens"], th["fit"])
                fit[str(visual)][name] = {"prompt": prompt.__dict__, "theory": th, "measured": m}
                log(
                    started,
                    f"fit {visual:>6} visual {name:<21} prompt {prompt.length:>6}: peak running "
                    f"{m['peak_running']:>4} (theory {th['fit']:>4}; {m['running_at_first_finish']:>4} at the first "
                    f"finish, theory through decode {th['fit_through_decode']:>4}), {th['pages_per_request']} pages "
                    f"per request, {m['preemptions']} preemptions",
                )
        arrivals = arrival_steps(sizes["stream_interval"], sizes["stream_steps"])
        stream = {}
        for name, arm in ARMS.items():
            prompt = prompts[name][STREAM_VISUAL]
            stream[name] = s = measure_stream(
                vc, configs[name], arm, prompt, sizes["max_tokens"], arrivals, sizes["stream_steps"]
            )
            log(
                started,
                f"stream {name:<21} finished {s['finished']:>4}/{s['arrived']}, preemptions {s['preemptions']:>4}, "
                f"running mean {s['mean_running']:5.1f} peak {s['peak_running']:>3}, waiting mean "
                f"{s['mean_waiting']:5.1f}, steps to first schedule {s['mean_steps_to_first_schedule']:.1f}",
            )
    restore()
    return {
        "block": block,
        "pattern": NANO_12B_V2.pattern,
        "attention_stages": attention_stages(NANO_12B_V2.pattern),
        "kv_gib": kv_gib,
        "max_model_len": max_model_len,
        "max_num_batched_tokens": max_model_len,
        "max_num_seqs": 1024,
        "max_tokens": sizes["max_tokens"],
        "prompt_tokens": {"frame_visual": FRAME_TOKENS, "frame_text": FRAME_TEXT, "question": QUESTION_TOKENS},
        "groups": groups,
        "fit": fit,
        "stream": {
            "visual": STREAM_VISUAL,
            "mean_interval_steps": sizes["stream_interval"],
            "steps": sizes["stream_steps"],
            "arrivals": len(arrivals),
            "arms": stream,
        },
    }


# ------------------------------------------------------------------ part B: the real engine


def e2e_prompt_length(checkpoint: Path, frames: int) -> int:
    """Prompt tokens of one video request, as the plugin's processor lays it out."""
    from transformers import AutoTokenizer

    from vllm_stateful_reduce.media import video_metadata
    from vllm_stateful_reduce.model.hf_config import NemotronNanoVLConfig
    from vllm_stateful_reduce.model.processing import NanoVLPreprocessor
    from vllm_stateful_reduce.testing.tokenizer import chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    processor = NanoVLPreprocessor(NemotronNanoVLConfig.from_pretrained(checkpoint), tokenizer)
    ids = tokenizer.encode(chat_prompt(E2E_QUESTION), add_special_tokens=False)
    meta = video_metadata(frames)
    video = processor.video_replacement(frames, meta["frames_indices"], int(1000 / meta["fps"])).full
    return len(ids) - 1 + len(video)


def e2e_budget(checkpoint: Path, prompt_length: int, off_fit: int) -> dict:
    """kv_cache_memory_bytes for which the free_dropped_kv=false engine holds `off_fit`
    requests through their last token: vLLM's grouping of the checkpoint's specs (as
    the CPU engine makes them) in closed form, plus the null block."""
    geo = Geometry(ModelDims.from_checkpoint(checkpoint), "float32", "float32", CPU_KERNEL_BLOCK)
    block = hybrid_block_size(geo)
    max_model_len = 4096
    with tempfile.TemporaryDirectory(prefix="vsr-capacity-") as tmp:
        vc = make_vllm_config(write_model_dir(Path(tmp), max_model_len), max_model_len, block["block_size"])
        off = kv_cache_config(vc, layer_specs(geo, False, block, max_model_len), 2**30)
    per_request = blocks_per_request(off, prompt_length + E2E_MAX_TOKENS - 1, ())
    return {
        "kv_cache_memory_bytes": (off_fit * per_request + 1) * bytes_per_block(off),
        "predicted_block_size": block["block_size"],
        "off_blocks_per_request": per_request,
        "off_bytes_per_block": bytes_per_block(off),
    }


def e2e_requests(count: int, frames: int, seed: int) -> list[dict]:
    import numpy as np

    from vllm_stateful_reduce.media import video_metadata
    from vllm_stateful_reduce.testing.tokenizer import chat_prompt

    side = 128  # the checkpoint's frame size
    return [
        {
            "prompt": chat_prompt(E2E_QUESTION),
            "multi_modal_data": {
                "video": (
                    np.random.default_rng(seed + i).integers(0, 256, (frames, side, side, 3), dtype=np.uint8),
                    video_metadata(frames),
                )
            },
        }
        for i in range(count)
    ]


def preemptions(llm) -> int:
    return int(sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"))


class RunningRecorder:
    """Wraps the in-process scheduler's `schedule` to record len(running) after each
    step, and the drops it predicted (the DropBook forgets them at finish)."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.running: list[int] = []
        self.times: list[float] = []  # monotonic time of each step's schedule()
        self.drops: dict[str, tuple[int, ...]] = {}
        schedule = scheduler.schedule

        def recorded(*args, **kwargs):
            out = schedule(*args, **kwargs)
            self.times.append(time.monotonic())
            self.running.append(len(scheduler.running))
            book = getattr(scheduler, "kv_drops", None)
            if book is not None:
                self.drops.update(book.predicted)
            return out

        scheduler.schedule = recorded

    def clear(self) -> None:
        self.running.clear()
        self.times.clear()
        self.drops.clear()


def e2e_engine(checkpoint: Path, free: bool, kv_bytes: int, max_num_seqs: int):
    from vllm import LLM

    from vllm_stateful_reduce import REQUIRED_ENGINE_ARGS

    return LLM(
        model=str(checkpoint),
        dtype="float32",
        max_model_len=4096,
        max_num_batched_tokens=4096,
        max_num_seqs=max_num_seqs,
        limit_mm_per_prompt={"video": 1},
        seed=0,
        disable_log_stats=False,
        kv_cache_memory_bytes=kv_bytes,
        additional_config={"stateful_reduce": {"free_dropped_kv": free}},
        **REQUIRED_ENGINE_ARGS,
    )


def e2e_arm(checkpoint: Path, free: bool, kv_bytes: int, requests: list[dict], warm: list[dict], started) -> dict:
    """One engine: a warm-up batch, then the measured batch; running counts, preemptions,
    wall time to drain, output token ids, the engine's KV-cache layout."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=E2E_MAX_TOKENS, temperature=0.0, ignore_eos=True)
    t0 = time.monotonic()
    llm = e2e_engine(checkpoint, free, kv_bytes, max_num_seqs=len(requests))
    engine_seconds = time.monotonic() - t0
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    kv_cfg = scheduler.kv_cache_config
    if kv_cfg.num_blocks != kv_bytes // bytes_per_block(kv_cfg):
        raise RuntimeError(
            f"the engine has {kv_cfg.num_blocks} KV blocks of {bytes_per_block(kv_cfg)} B, not the "
            f"kv_cache_memory_bytes={kv_bytes} asked for (is VLLM_CPU_KVCACHE_SPACE set?)"
        )
    recorder = RunningRecorder(scheduler)
    llm.generate(warm, params, use_tqdm=False)
    recorder.clear()
    before = preemptions(llm)
    t0 = time.monotonic()
    outputs = llm.generate(requests, params, use_tqdm=False)
    drain = time.monotonic() - t0
    result = {
        "free_dropped_kv": free,
        "scheduler": type(scheduler).__name__,
        "engine_start_seconds": engine_seconds,
        "groups": describe_groups(kv_cfg),
        "engine_block_size": scheduler.cache_config.block_size,
        "peak_running": max(recorder.running),
        "mean_running": sum(recorder.running) / len(recorder.running),
        "steps": len(recorder.running),
        "running_per_step": list(recorder.running),
        "preemptions": preemptions(llm) - before,
        "drain_seconds": drain,
        # from generate() to the first step: the front end's processing of the videos
        "seconds_to_first_step": recorder.times[0] - t0,
        "step_seconds": [b - a for a, b in zip(recorder.times, recorder.times[1:], strict=False)],
        "blocks_not_allocated": getattr(getattr(scheduler, "kv_drops", None), "blocks_not_allocated", None),
        "prompt_lengths": sorted({len(o.prompt_token_ids) for o in outputs}),
        "predicted_drops": sorted({tuple(d) for d in recorder.drops.values()}),
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
    }
    length = max(result["prompt_lengths"])
    drops = result["predicted_drops"][0] if len(result["predicted_drops"]) == 1 else ()
    result["theory"] = theory(
        kv_cfg, length, drops, E2E_MAX_TOKENS, kv_cfg.kv_cache_groups[0].kv_cache_spec.page_size_bytes
    )
    llm.llm_engine.engine_core.shutdown()
    del llm, scheduler, recorder
    gc.collect()
    log(
        started,
        f"e2e free_dropped_kv={str(free).lower():<5} {result['scheduler']}: block size {result['engine_block_size']}, "
        f"{result['groups']['groups']} KV-cache groups, {result['groups']['num_blocks']} blocks; running peak "
        f"{result['peak_running']} (theory {result['theory']['fit']}) mean {result['mean_running']:.2f}, "
        f"{result['preemptions']} preemptions, drained in {drain:.1f} s",
    )
    return result


def end_to_end(sizes: dict, started: float) -> dict:
    """Part B: free_dropped_kv false vs true on the committed long-video model, the arms
    alternating (order flipped every rep), same KV bytes."""
    checkpoint = LONG_MODEL
    length = e2e_prompt_length(checkpoint, E2E_FRAMES)
    budget = e2e_budget(checkpoint, length, sizes["e2e_off_fit"])
    log(
        started,
        f"e2e: {checkpoint.name}, {sizes['e2e_requests']} requests of {E2E_FRAMES} frames ({length} prompt tokens), "
        f"kv_cache_memory_bytes {budget['kv_cache_memory_bytes']} (off: {budget['off_blocks_per_request']} blocks "
        f"of {budget['off_bytes_per_block']} B per request, {sizes['e2e_off_fit']} requests)",
    )
    requests = e2e_requests(sizes["e2e_requests"], E2E_FRAMES, seed=100)
    # a small batch of its own first in every engine: the measured batch's shapes (two
    # prefills per step, decode batches up to either arm's peak) are then not new to it
    warm = e2e_requests(sizes["e2e_off_fit"] + 2, E2E_FRAMES, seed=7)
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for rep in range(sizes["e2e_reps"]):
        for free in (False, True) if rep % 2 == 0 else (True, False):
            runs[free].append(e2e_arm(checkpoint, free, budget["kv_cache_memory_bytes"], requests, warm, started))
    identical = all(r["token_ids"] == runs[False][0]["token_ids"] for r in runs[False] + runs[True])
    drain = {free: [r["drain_seconds"] for r in rs] for free, rs in runs.items()}
    ratios = [a / b for a, b in zip(drain[False], drain[True], strict=True)]  # per rep (each rep: one engine per arm)
    for rs in runs.values():
        for r in rs[1:]:
            r.pop("token_ids")
    return {
        "checkpoint": str(checkpoint.relative_to(ROOT)),
        "pattern": ModelDims.from_checkpoint(checkpoint).pattern,
        "frames": E2E_FRAMES,
        "prompt_length": length,
        "max_tokens": E2E_MAX_TOKENS,
        "requests": sizes["e2e_requests"],
        "reps": sizes["e2e_reps"],
        "budget": budget,
        "arms": {("true" if free else "false"): rs for free, rs in runs.items()},
        "outputs_identical": identical,
        "drain_seconds": {("true" if f else "false"): v for f, v in drain.items()},
        # each arm's least disturbed run (on a shared machine a step's time varies 10x and more
        # with other processes' load; see step_seconds), then the median of the per-rep ratios
        "drain_time_ratio": min(drain[False]) / min(drain[True]),
        "drain_time_ratio_median": statistics.median(ratios),
        "drain_time_ratios": ratios,
        "first_arm_per_rep": ["false" if rep % 2 == 0 else "true" for rep in range(sizes["e2e_reps"])],
        # scheduler steps to drain the batch: what capacity changes, free of the machine's load
        "drain_steps": {("true" if f else "false"): [r["steps"] for r in rs] for f, rs in runs.items()},
        "real_pattern_checkpoint": None,
        "real_pattern_note": "no checkpoint with Nano 12B v2's 62-block pattern under models/ (the committed ones are "
        "13-block M*-M-M*-M-M*-); the real pattern is simulated in part A only",
    }


# ------------------------------------------------------------------ report


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def build_summary(report: dict) -> dict:
    sim, e2e = report["simulation"], report.get("e2e")
    fit = sim["fit"]

    def fit_ratio(size: str, key: str, arm: str = "ours_25") -> float | None:
        if size not in fit:
            return None
        field, value = {
            "measured": ("measured", "peak_running"),
            "sustained": ("measured", "running_at_first_finish"),
            "theory": ("theory", "fit"),
        }[key]
        return ratio(fit[size][arm][field][value], fit[size]["off"][field][value])

    stream = sim["stream"]["arms"]
    summary = {
        "block_size": sim["block"]["block_size"],
        "kv_gib": sim["kv_gib"],
        "sim_ratio_at_8k": fit_ratio("8192", "measured"),
        "sim_ratio_at_32k": fit_ratio("32768", "measured"),
        # still running when the first request finished (after any preemption the decode caused)
        "sim_sustained_ratio_at_8k": fit_ratio("8192", "sustained"),
        "sim_sustained_ratio_at_32k": fit_ratio("32768", "sustained"),
        "theory_ratio_at_8k": fit_ratio("8192", "theory"),
        "theory_ratio_at_32k": fit_ratio("32768", "theory"),
        "sim_ratios": {size: {arm: fit_ratio(size, "measured", arm) for arm in ARMS if arm != "off"} for size in fit},
        "theory_ratios": {size: {arm: fit_ratio(size, "theory", arm) for arm in ARMS if arm != "off"} for size in fit},
        "stream_preemptions": {arm: s["preemptions"] for arm, s in stream.items()},
        "stream_mean_running": {arm: s["mean_running"] for arm, s in stream.items()},
        "stream_finished": {arm: s["finished"] for arm, s in stream.items()},
        "stream_finished_ratio": ratio(stream["ours_25"]["finished"], stream["off"]["finished"]),
        "e2e_peak_running_ratio": None,
        "e2e_outputs_identical": None,
    }
    if e2e is not None:
        off, on = e2e["arms"]["false"], e2e["arms"]["true"]
        summary |= {
            "e2e_peak_running": {"false": off[0]["peak_running"], "true": on[0]["peak_running"]},
            "e2e_peak_running_theory": {"false": off[0]["theory"]["fit"], "true": on[0]["theory"]["fit"]},
            "e2e_peak_running_ratio": ratio(on[0]["peak_running"], off[0]["peak_running"]),
            "e2e_mean_running": {"false": off[0]["mean_running"], "true": on[0]["mean_running"]},
            "e2e_preemptions": {"false": sum(r["preemptions"] for r in off), "true": sum(r["preemptions"] for r in on)},
            "e2e_outputs_identical": e2e["outputs_identical"],
            "e2e_drain_seconds": e2e["drain_seconds"],
            # false / true, fastest run of each arm: > 1, the true arm drains faster
            "e2e_drain_time_ratio": e2e["drain_time_ratio"],
            "e2e_drain_time_ratio_median": e2e["drain_time_ratio_median"],  # of the per-rep ratios
            "e2e_drain_steps": {arm: steps[0] for arm, steps in e2e["drain_steps"].items()},
            "e2e_drain_steps_ratio": ratio(e2e["drain_steps"]["false"][0], e2e["drain_steps"]["true"][0]),
            "e2e_real_pattern_checkpoint": e2e["real_pattern_checkpoint"],
        }
    return summary


def print_tables(report: dict) -> None:
    sim = report["simulation"]
    print(
        f"\nRequests that fit at once, Nano 12B v2 VL geometry, {sim['kv_gib']:g} GiB, block "
        f"{sim['block']['block_size']} tokens: measured peak running (closed form), x vs off"
    )
    arms = list(ARMS)
    print(f"{'visual':>8}" + "".join(f"{a:>25}" for a in arms))
    for size, by_arm in sim["fit"].items():
        off = by_arm["off"]
        cells = []
        for arm in arms:
            m, t = by_arm[arm]["measured"]["peak_running"], by_arm[arm]["theory"]["fit"]
            x = "" if arm == "off" else f" {m / off['measured']['peak_running']:.2f}x"
            cells.append(f"{m:>5} ({t:>4}){x:>7}" + ("*" if by_arm[arm]["measured"]["preemptions"] else " "))
        print(f"{size:>8}" + "".join(f"{c:>25}" for c in cells))
    print("(* preemptions before the first request finished: the peak includes requests later preempted)")
    st = sim["stream"]
    print(
        f"\nArrival stream: {st['visual']} visual tokens, Poisson mean interval {st['mean_interval_steps']:g} steps, "
        f"{st['steps']} steps, {st['arrivals']} arrivals"
    )
    print(f"{'arm':<22}{'finished':>9}{'preempt':>9}{'run mean':>10}{'run peak':>10}{'wait mean':>10}{'to sched':>10}")
    for arm, s in st["arms"].items():
        print(
            f"{arm:<22}{s['finished']:>9}{s['preemptions']:>9}{s['mean_running']:>10.1f}{s['peak_running']:>10}"
            f"{s['mean_waiting']:>10.1f}{s['mean_steps_to_first_schedule']:>10.1f}"
        )
    e2e = report.get("e2e")
    if e2e is not None:
        print(
            f"\nEnd to end ({e2e['checkpoint']}, {e2e['requests']} x {e2e['frames']} frames, {e2e['prompt_length']} "
            f"prompt tokens, kv_cache_memory_bytes {e2e['budget']['kv_cache_memory_bytes']})"
        )
        print(
            f"{'free_dropped_kv':<16}{'groups':>7}{'blocks':>8}{'peak (theory)':>15}{'mean':>7}{'preempt':>9}"
            f"{'steps':>7}  drain s (per rep)"
        )
        for name, runs in e2e["arms"].items():
            r = runs[0]
            drains = ", ".join(f"{x['drain_seconds']:.1f}" for x in runs)
            print(
                f"{name:<16}{r['groups']['groups']:>7}{r['groups']['num_blocks']:>8}"
                f"{r['peak_running']:>8} ({r['theory']['fit']:>3}){r['mean_running']:>8.2f}"
                f"{sum(x['preemptions'] for x in runs):>9}{r['steps']:>7}  {drains}"
            )
        print(
            f"outputs identical: {e2e['outputs_identical']}; drain time false/true {e2e['drain_time_ratio']:.2f} "
            f"(fastest runs; median of the reps' {e2e['drain_time_ratio_median']:.2f}; per rep "
            f"{', '.join(f'{x:.2f}' for x in e2e['drain_time_ratios'])}, first arm per rep "
            f"{', '.join(e2e['first_arm_per_rep'])}); drain steps false/true "
            f"{e2e['drain_steps']['false'][0] / e2e['drain_steps']['true'][0]:.2f}"
        )
    print("summary: " + json.dumps(report["summary"]))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sim = report["simulation"]
    sizes = sorted(int(s) for s in sim["fit"])
    colours = dict(zip(ARMS, plt.cm.tab10.colors, strict=False))
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 5))
    for arm in ARMS:
        by = [sim["fit"][str(s)][arm] for s in sizes]
        left.plot(sizes, [b["measured"]["peak_running"] for b in by], marker="o", color=colours[arm], label=arm)
        left.plot(sizes, [b["theory"]["fit"] for b in by], ls="--", color=colours[arm], alpha=0.6)
        if arm != "off":
            off = [sim["fit"][str(s)]["off"] for s in sizes]
            middle.plot(
                sizes,
                [b["measured"]["peak_running"] / o["measured"]["peak_running"] for b, o in zip(by, off, strict=True)],
                marker="o",
                color=colours[arm],
                label=arm,
            )
            middle.plot(
                sizes,
                [b["theory"]["fit"] / o["theory"]["fit"] for b, o in zip(by, off, strict=True)],
                ls="--",
                color=colours[arm],
                alpha=0.6,
            )
    left.plot([], [], ls="--", color="grey", label="closed form")
    for ax in (left, middle):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [f"{s // 1024}k" for s in sizes])
        ax.set_xlabel("visual tokens per request")
    left.set_yscale("log")
    left.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    left.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    left.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_ylabel("requests that fit at once (peak running)")
    left.set_title(f"Nano 12B v2 VL geometry, {sim['kv_gib']:g} GiB KV, block {sim['block']['block_size']}")
    middle.axhline(1.0, color="black", lw=0.5)
    middle.set_ylabel("requests that fit, x vs off")
    middle.set_title("measured (solid) vs closed form (dashed)")
    st = sim["stream"]
    styles = dict(zip(ARMS, ["-", "--", "-", ":", "-."], strict=True))
    for arm, s in st["arms"].items():
        right.plot(s["running_per_step"], color=colours[arm], ls=styles[arm], label=arm, lw=1.5)
    right.set_xlabel("scheduler step")
    right.set_ylabel("running requests")
    right.set_title(
        f"arrival stream, {st['visual'] // 1024}k visual, mean interval {st['mean_interval_steps']:g} steps"
    )
    for ax in (left, middle, right):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------ main


def set_environment() -> None:
    """Before vLLM is imported: offline, the plugin, the engine core in this process
    (its scheduler is read directly), IPC sockets in a private temp dir."""
    run_tmp = tempfile.mkdtemp(prefix="vsr-capacity-")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("VLLM_PLUGINS", "stateful_reduce")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # vLLM's CPU platform lets this legacy variable override kv_cache_memory_bytes (the
    # tests set it): part B's arms must get exactly the bytes it passes
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    os.environ["TMPDIR"] = os.environ["VLLM_RPC_BASE_PATH"] = run_tmp
    tempfile.tempdir = run_tmp


def resolve_sizes(args: argparse.Namespace) -> dict:
    defaults = QUICK if args.quick else FULL
    sizes = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in defaults.items()}
    for value in sizes["sizes"]:
        if value <= 0 or value % FRAME_TOKENS:
            raise SystemExit(f"--sizes: {value} is not a positive multiple of {FRAME_TOKENS} (whole frames)")
    if sizes["e2e_requests"] < 1 or sizes["e2e_reps"] < 1 or sizes["e2e_off_fit"] < 1:
        raise SystemExit("--e2e-requests, --e2e-reps and --e2e-off-fit must be at least 1")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", help=f"visual tokens per request (default {FULL['sizes']})")
    parser.add_argument("--kv-gib", type=float, default=40.0, help="KV-cache bytes of every simulated arm (GiB)")
    parser.add_argument("--max-tokens", type=int, help="decode tokens per simulated request (default 128)")
    parser.add_argument("--stream-steps", type=int, help="scheduler steps of the arrival stream")
    parser.add_argument("--stream-interval", type=float, help="mean steps between arrivals (default 2)")
    parser.add_argument("--e2e-requests", type=int, help="concurrent requests end to end (default 24)")
    parser.add_argument("--e2e-reps", type=int, help="engine pairs end to end, order alternating (default 3)")
    parser.add_argument("--e2e-off-fit", type=int, help="requests the free_dropped_kv=false engine holds (default 10)")
    parser.add_argument("--skip-e2e", action="store_true", help="part A only")
    parser.add_argument("--quick", action="store_true", help=f"small sizes {QUICK} (under 3 min here)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path, help="default: next to --json")
    args = parser.parse_args()
    sizes = resolve_sizes(args)
    set_environment()
    started = time.monotonic()
    log(started, f"sizes {sizes}")
    report: dict = {"settings": sizes | {"kv_gib": args.kv_gib}}
    report["simulation"] = simulate(sizes, args.kv_gib, started)
    report["e2e"] = None if args.skip_e2e else end_to_end(sizes, started)
    report["summary"] = build_summary(report)
    report["wall_seconds"] = time.monotonic() - started
    print_tables(report)
    print(f"({report['wall_seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    png = args.png or (args.json.with_suffix(".png") if args.json else None)
    if png:
        plot(report, png)


if __name__ == "__main__":
    sys.exit(main())
