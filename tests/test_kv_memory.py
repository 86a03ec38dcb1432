"""Reduction that frees KV memory (adapter/kv_stages.py), end to end on the real engine.

Two in-process engines (the scheduler and the worker are read directly): today's path
(`free_dropped_kv: false`, a KV cache that holds the whole batch) and the plugin's
default (stages' blocks sized for the rows they keep) in a KV cache small enough to
preempt. The same mixed batch on both: reduced videos, `enabled: false`, text only, EVS,
per-request budgets, a question before the video (unreduced, and reduced on request),
two videos in one prompt. Greedy tokens and log-probs must be equal; after every batch
the block pool must be whole again. And for every request, the scheduler's predicted
drops must equal what the worker dropped, and apply only where the worker reduced.
"""

import os
from collections.abc import Iterator

import numpy as np
import pytest
from vllm import LLM, SamplingParams

from vllm_stateful_reduce.adapter.kv_stages import StageFullAttentionSpec

from .helpers import chat_prompt, engine_kwargs, preemptions, random_video, shutdown, video_metadata, video_prompt

pytestmark = pytest.mark.engine  # starts a vLLM engine

MAX_TOKENS = 24
MAX_MODEL_LEN = 1024  # the batch's longest prompt is ~900 tokens
# 48 blocks (vLLM's CPU build sizes the cache from VLLM_CPU_KVCACHE_SPACE, which the test
# environment sets, over kv_cache_memory_bytes): a ~900-token request needs 29 when every
# layer holds every token (5 Mamba groups + 3 x 8 attention blocks of 128 tokens), ~16
# reduced, so three run at once and decode steps preempt
NUM_BLOCKS = 48
SETTINGS = {"max_model_len": MAX_MODEL_LEN, "max_num_batched_tokens": MAX_MODEL_LEN}


def reduction(**options) -> dict:
    """The engines' reduction settings: the same but for `options`."""
    return {"stateful_reduce": {"min_keep": 4, **options}}


LOGPROB_TOLERANCE = 1e-5  # float32; batches differ under preemption (seen: 4.8e-7; without it: equal)


def video_request(seed: int, frames: int, options: dict | None = None, order: str = "video_first") -> dict:
    return video_prompt(random_video(frames, seed=seed), options=options, order=order)


def two_videos(seed: int) -> dict:
    prompt = "<|im_start|>user\n<video>\n<video>\nWhich video is brighter?<|im_end|>\n<|im_start|>assistant\n"
    videos = [(random_video(20, seed=seed + k), video_metadata(20)) for k in range(2)]
    return {"prompt": prompt, "multi_modal_data": {"video": videos}}


def mixed_batch() -> list[dict]:
    return [
        video_request(1, 48),
        video_request(2, 40),
        video_request(3, 48, {"enabled": False}),
        {"prompt": chat_prompt("Say something about squares.", with_video=False)},
        video_request(4, 48, {"evs_rate": 0.5}),
        video_request(5, 40, {"budget": 0.5}),
        video_request(6, 40, order="text_first"),
        video_request(7, 48, {"reduce_question_before_media": True}, order="text_first"),
        two_videos(8),
        video_request(9, 48, {"evs_rate": 0.3, "budget": 0.4}),
    ]


PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def in_process() -> Iterator[None]:
    """Engine core and worker in this process, so the tests read the scheduler and model."""
    old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    yield
    if old is None:
        del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
    else:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def model_of(llm):
    return llm.llm_engine.collective_rpc(lambda w: w.model_runner.model)[0]


def outputs(results) -> list[tuple[list[int], list[float]]]:
    return [
        (
            list(r.outputs[0].token_ids),
            [lp[t].logprob for lp, t in zip(r.outputs[0].logprobs, r.outputs[0].token_ids, strict=True)],
        )
        for r in results
    ]


def assert_pool_whole(llm) -> None:
    pool = scheduler_of(llm).kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # the null block
    drops = getattr(scheduler_of(llm), "kv_drops", None)
    if drops is not None:
        assert not drops.predicted and not drops.reducing, "a finished request left its drops behind"


@pytest.fixture(scope="module")
def today(checkpoint) -> list:
    """Today's path: every layer holds every token, a KV cache that holds the batch (in
    its own engine process: an in-process engine's shutdown tears down this process's
    distributed state, which the in-process engine below needs)."""
    llm = LLM(**engine_kwargs(checkpoint, **SETTINGS, additional_config=reduction(free_dropped_kv=False)))
    results = outputs(llm.generate(mixed_batch(), PARAMS))
    shutdown(llm)
    return results


class Recorder:
    """What each side decided per request: the scheduler's predicted drops and whether it
    allocated with them; the worker's dropped counts at each fresh prefill."""

    def __init__(self, llm) -> None:
        self.predicted: dict[str, tuple[int, ...]] = {}
        self.admitted_with_drops: dict[str, bool] = {}
        self.worker: dict[str, list[list[int]]] = {}
        sched, state = scheduler_of(llm), model_of(llm).reduction_state
        book = sched.kv_drops
        add_request, admitted, record = sched.add_request, book.admitted, state.record

        def add(request) -> None:
            add_request(request)
            self.predicted[request.request_id] = book.predicted.get(request.request_id, ())

        def admit(request_id, num_tokens, rows, block_size, first) -> None:
            if first:
                self.admitted_with_drops[request_id] = self.admitted_with_drops.get(request_id, False) or (
                    rows < num_tokens
                )
            admitted(request_id, num_tokens, rows, block_size, first)

        def worker_record(req_id, dropped) -> None:
            self.worker.setdefault(req_id, []).append(list(dropped))
            record(req_id, dropped)

        sched.add_request, book.admitted, state.record = add, admit, worker_record


@pytest.fixture(scope="module")
def freeing(checkpoint, today, in_process):
    """The plugin's default, in a KV cache too small for the batch at once (started after
    today's engine is gone)."""
    llm = LLM(
        **engine_kwargs(
            checkpoint,
            **SETTINGS,
            num_gpu_blocks_override=NUM_BLOCKS,
            disable_log_stats=False,
            additional_config=reduction(),
        )
    )
    recorder = Recorder(llm)
    yield llm, recorder
    shutdown(llm)


def test_stages_get_their_own_kv_cache_groups(freeing) -> None:
    llm, _ = freeing
    groups = scheduler_of(llm).kv_cache_manager.kv_cache_config.kv_cache_groups
    stages = [g.kv_cache_spec.stage for g in groups if isinstance(g.kv_cache_spec, StageFullAttentionSpec)]
    stack = model_of(llm).language_model.model
    with_attention = [j for j, layers in enumerate(stack.stage_layers) if layers.attention]
    assert sorted(stages) == with_attention, stages  # one group per stage here
    assert len({g.kv_cache_spec.page_size_bytes for g in groups}) == 1  # vLLM's uniform page


def test_freeing_kv_changes_no_output_under_preemption(today, freeing) -> None:
    llm, recorder = freeing
    before = preemptions(llm)
    ours = outputs(llm.generate(mixed_batch(), PARAMS))
    preempted = preemptions(llm) - before
    print(f"{preempted} preemptions; blocks not allocated: {scheduler_of(llm).kv_drops.blocks_not_allocated}")
    assert preempted > 0, "the KV cache was meant to be too small for the batch"
    assert scheduler_of(llm).kv_drops.blocks_not_allocated > 0
    worst = 0.0
    for i, ((tokens, logprobs), (ref_tokens, ref_logprobs)) in enumerate(zip(ours, today, strict=True)):
        assert tokens == ref_tokens, i
        worst = max(worst, float(np.max(np.abs(np.subtract(logprobs, ref_logprobs)))))
    print(f"max |log-prob difference| {worst:.2e} (tolerance {LOGPROB_TOLERANCE})")
    assert worst < LOGPROB_TOLERANCE
    assert_pool_whole(llm)


def test_scheduler_predicts_exactly_what_the_worker_drops(freeing) -> None:
    """Over the mixed batch (run above, with preemptions): where the worker reduced a
    prefill, the scheduler predicted the same drops and allocated with them; where it
    did not, the scheduler allocated every token."""
    llm, recorder = freeing
    if not recorder.worker:
        llm.generate(mixed_batch(), PARAMS)
    assert recorder.predicted and recorder.worker
    for req_id, prefills in recorder.worker.items():
        predicted = recorder.predicted[req_id]
        reduced = any(any(d) for d in prefills)
        if reduced:
            assert all(tuple(d) == predicted for d in prefills), (req_id, predicted, prefills)
            assert recorder.admitted_with_drops[req_id], req_id
        else:
            assert not recorder.admitted_with_drops.get(req_id, False), (req_id, predicted)
    assert any(any(p) for p in recorder.predicted.values())


def test_kv_cache_usage_counts_only_the_kept_rows(freeing) -> None:
    """vLLM's own `vllm:kv_cache_usage_perc` (the scheduler's stats) after one reduced
    prefill: one block per Mamba group, and per stage group the blocks of the rows the
    stage keeps, out of the pool's usable blocks."""
    llm, _ = freeing
    engine, sched = llm.llm_engine, scheduler_of(llm)
    engine.add_request("usage", video_request(30, 48), SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()  # the prefill
    (request,) = sched.running
    drops = sched.kv_drops.predicted[request.request_id]
    config = sched.kv_cache_manager.kv_cache_config
    held = 0
    for group in config.kv_cache_groups:
        spec = group.kv_cache_spec
        if isinstance(spec, StageFullAttentionSpec):
            held += -(-(request.num_prompt_tokens - drops[spec.stage]) // spec.block_size)
        else:
            held += 1  # a Mamba group's state
    whole = sum(
        -(-request.num_prompt_tokens // g.kv_cache_spec.block_size)
        if isinstance(g.kv_cache_spec, StageFullAttentionSpec)
        else 1
        for g in config.kv_cache_groups
    )
    usage = sched.make_stats().kv_cache_usage
    print(f"{held} blocks held of {whole} without reduction; usage {usage:.4f}")
    assert held < whole and usage == pytest.approx(held / (config.num_blocks - 1))
    while engine.has_unfinished_requests():
        engine.step()
    assert_pool_whole(llm)


def test_aborts_at_every_point_return_every_block(freeing) -> None:
    """Abort requests waiting, right after their prefill, and mid-decode; the rest
    finish as they do alone; the pool is whole again."""
    llm, _ = freeing
    engine = llm.llm_engine
    prompts = [video_request(20 + i, 48) for i in range(5)]
    ids = [f"abort-{i}" for i in range(len(prompts))]
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for req_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(req_id, prompt, long)
    sched = scheduler_of(llm)
    engine.abort_request([ids[-1]])  # still waiting
    aborted, steps = {ids[-1]}, 0
    # ids[0] mid-decode (10 tokens out), ids[1] right after its prefill (1 token out)
    when = {ids[0]: 10, ids[1]: 1}
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished and out.outputs:
                finished[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
        for request in sched.running:
            external = request.request_id.rsplit("-", 1)[0]  # vLLM appends a suffix
            if when.get(external) == request.num_output_tokens and external not in aborted:
                engine.abort_request([external])
                aborted.add(external)
    print(f"aborted {sorted(aborted)} over {steps} steps")
    assert aborted == {ids[0], ids[1], ids[-1]}
    alone = llm.generate(prompts[2:4], long)
    assert [finished[i] for i in ids[2:4]] == [list(r.outputs[0].token_ids) for r in alone]
    assert_pool_whole(llm)
