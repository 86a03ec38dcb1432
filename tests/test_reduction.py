"""Reduction inside prefill through the real engine, against the plain PyTorch reference.

One engine (float32, default schedule: budget 0.25 depth-averaged, boundaries after
the attention blocks, attention + Mamba scores); min_keep is lowered so the small
videos here are reduced by the schedule rather than by the floor.
"""

from itertools import pairwise

import numpy as np
import pytest
from vllm import LLM, SamplingParams

from vllm_stateful_reduce.config import parse
from vllm_stateful_reduce.model.hf_config import NemotronNanoVLConfig
from vllm_stateful_reduce.model.processing import frames_to_pixel_values
from vllm_stateful_reduce.schedule import build_schedule, stage_sizes

from .helpers import engine_kwargs, random_video, shutdown, video_metadata, video_prompt

pytestmark = pytest.mark.engine  # starts a vLLM engine or server

GLOBAL = {"min_keep": 4, "record_kept": True}
DECODE_TOKENS = 16


@pytest.fixture(scope="module")
def llm(checkpoint):
    llm = LLM(**engine_kwargs(checkpoint, additional_config={"stateful_reduce": GLOBAL}))
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def hf_config(checkpoint) -> NemotronNanoVLConfig:
    return NemotronNanoVLConfig.from_pretrained(checkpoint)


def engine_state(llm) -> dict:
    return llm.llm_engine.collective_rpc(
        lambda w: {
            "kept": dict(w.model_runner.model.reduction_state.kept),
            "skipped": dict(w.model_runner.model.reduction_state.skipped),
            "queries": dict(w.model_runner.model.reduction_state.queries),
        }
    )[0]


def kept_of(state: dict, request_id: str) -> list[list[int]] | None:
    return next((v for k, v in state["kept"].items() if k.split("-")[0] == request_id), None)


def params() -> SamplingParams:
    return SamplingParams(max_tokens=DECODE_TOKENS, temperature=0.0, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def mixed_batch(llm):
    """Reduced video, unreduced video, text only, and a video joining while they decode."""
    engine = llm.llm_engine
    cases = {
        "reduced": (random_video(24, seed=1), None),
        "unreduced": (random_video(12, seed=2), {"enabled": False}),
        "text": (None, None),
        "joins_late": (random_video(20, seed=3), {"budget": 0.5}),
    }
    outputs = {}
    for name in ("reduced", "unreduced", "text"):
        engine.add_request(name, video_prompt(cases[name][0], options=cases[name][1]), params())
    steps = 0
    while engine.has_unfinished_requests() or "joins_late" not in cases.get("_added", ()):
        if steps == 4:
            engine.add_request(
                "joins_late", video_prompt(cases["joins_late"][0], options=cases["joins_late"][1]), params()
            )
            cases["_added"] = ("joins_late",)
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        steps += 1
    assert set(outputs) == {"reduced", "unreduced", "text", "joins_late"}
    return cases, outputs, engine_state(llm)


def test_mixed_batch_matches_reference(mixed_batch, reference, hf_config) -> None:
    cases, outputs, state = mixed_batch
    worst = 0.0
    for name in ("reduced", "unreduced", "text", "joins_late"):
        video, options = cases[name]
        out = outputs[name]
        config = parse(GLOBAL).with_overrides(options)
        pixels = (
            [frames_to_pixel_values(video, hf_config.force_image_size, hf_config.norm_mean, hf_config.norm_std)]
            if video is not None
            else []
        )
        tokens, logprobs, kept = reference.greedy(out.prompt_token_ids, pixels, config, DECODE_TOKENS)
        assert list(out.outputs[0].token_ids) == tokens, name
        ours = kept_of(state, name)
        if name in ("reduced", "joins_late"):
            assert ours == [k.tolist() for k in kept], name
            assert len(ours[-1]) < len(ours[0])
        else:
            assert ours is None, name
        diff = max(
            abs(lp.logprob - logprobs[i, t].item())
            for i, step in enumerate(out.outputs[0].logprobs)
            for t, lp in step.items()
        )
        worst = max(worst, diff)
    print(f"mixed batch, {DECODE_TOKENS} greedy tokens each: max |delta logprob| vs reference {worst:.2e}")
    assert worst < 1e-4


def test_budget_is_the_depth_average_and_override_is_per_request(mixed_batch, hf_config) -> None:
    _, _, state = mixed_batch
    pattern = hf_config.text_config.hybrid_override_pattern
    for name, budget in (("reduced", 0.25), ("joins_late", 0.5)):
        kept = kept_of(state, name)
        schedule = build_schedule(pattern, parse(GLOBAL | {"budget": budget}))
        counts = [len(k) for k in kept]
        sizes = stage_sizes(len(pattern), schedule.boundaries)
        measured = sum(n * k for n, k in zip(sizes, counts, strict=True)) / len(pattern)
        print(
            f"{name}: kept per stage {counts}, depth average {measured:.2f} tokens vs budget {budget * counts[0]:.2f}"
        )
        assert abs(measured - budget * counts[0]) <= 1.0  # within one token per block on average
        assert counts == schedule.keep_counts(counts[0], GLOBAL["min_keep"])


def test_budget_one_is_identical_to_reduction_off(llm) -> None:
    video = random_video(16, seed=4)
    full, off = llm.generate(
        [video_prompt(video, options={"budget": 1.0}), video_prompt(video, options={"enabled": False})], params()
    )
    assert full.outputs[0].token_ids == off.outputs[0].token_ids
    assert [{t: lp.logprob for t, lp in s.items()} for s in full.outputs[0].logprobs] == [
        {t: lp.logprob for t, lp in s.items()} for s in off.outputs[0].logprobs
    ]


def test_video_without_question_is_served_unreduced_and_counted(llm) -> None:
    video = random_video(16, seed=5)
    before = engine_state(llm)["skipped"].get("no_text_after_video", 0)
    no_question = {"prompt": "<|im_start|>user\n<video>", "multi_modal_data": {"video": (video, video_metadata(16))}}
    unreduced = dict(no_question, mm_processor_kwargs={"stateful_reduce": {"enabled": False}})
    a, b = llm.generate([no_question, unreduced], params())
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert engine_state(llm)["skipped"].get("no_text_after_video", 0) == before + 1


def test_question_before_the_video_is_unreduced_unless_asked(llm, reference, hf_config) -> None:
    """The recipe's order (question, then video): by default served exactly as with
    reduction off, with its reason; asked to reduce, it is scored by the template's tail
    after the video, and its kept tokens and answer equal the reference's (whose query is
    the same rows: the prompt after the last media)."""
    video = random_video(16, seed=9)
    state = engine_state(llm)
    skipped, tails = state["skipped"].get("question_before_media", 0), state["queries"].get("template_tail", 0)
    first = video_prompt(video, order="text_first")
    off = video_prompt(video, options={"enabled": False}, order="text_first")
    asked = video_prompt(video, options={"reduce_question_before_media": True}, order="text_first")
    a, b, c = llm.generate([first, off, asked], params())
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    state = engine_state(llm)
    assert state["skipped"].get("question_before_media", 0) == skipped + 1
    assert state["queries"].get("template_tail", 0) == tails + 1
    pixels = frames_to_pixel_values(video, hf_config.force_image_size, hf_config.norm_mean, hf_config.norm_std)
    config = parse(GLOBAL | {"reduce_question_before_media": True})
    tokens, _, kept = reference.greedy(c.prompt_token_ids, [pixels], config, DECODE_TOKENS)
    assert list(c.outputs[0].token_ids) == tokens
    assert kept_of(state, c.request_id) == [k.tolist() for k in kept] and len(kept[-1]) < len(kept[0])


@pytest.mark.parametrize(
    "options,field", [({"budget": 2.0}, "budget"), ({"schedule": "step"}, "schedule"), ("half", "stateful_reduce")]
)
def test_invalid_per_request_options_are_value_errors(llm, options, field) -> None:
    with pytest.raises(ValueError, match=field):
        llm.generate([video_prompt(random_video(2), options=options)], params())
    text_only = {**video_prompt(None), "mm_processor_kwargs": {"stateful_reduce": options}}
    with pytest.raises(ValueError, match=field):  # checked without media too
        llm.generate([text_only], params())
    assert llm.generate([video_prompt(None)], SamplingParams(max_tokens=2))[0].outputs[0].token_ids  # still serving


def test_abort_leaves_no_state(llm) -> None:
    engine = llm.llm_engine
    engine.add_request("to_abort", video_prompt(random_video(16, seed=6)), params())
    for _ in range(3):  # prefill (reduced) + two decode steps
        engine.step()
    dropped = lambda: llm.collective_rpc(lambda w: set(w.model_runner.model.reduction_state.dropped))[0]  # noqa: E731
    assert any(k.startswith("to_abort") for k in dropped())
    engine.abort_request(["to_abort"])
    out = llm.generate([video_prompt(None)], SamplingParams(max_tokens=2))  # a later step prunes it
    assert out[0].outputs[0].token_ids
    assert not any(k.startswith("to_abort") for k in dropped())


def served_like_reference(llm, reference, hf_config, video: np.ndarray, options: dict):
    """Serve one video request; assert the reference's greedy tokens and kept positions."""
    out = llm.generate([video_prompt(video, options=options)], params())[0]
    ours = kept_of(engine_state(llm), out.request_id)
    pixels = [frames_to_pixel_values(video, hf_config.force_image_size, hf_config.norm_mean, hf_config.norm_std)]
    tokens, _, kept = reference.greedy(
        out.prompt_token_ids, pixels, parse(GLOBAL).with_overrides(options), DECODE_TOKENS
    )
    assert list(out.outputs[0].token_ids) == tokens
    assert ours == [k.tolist() for k in kept]
    return out, ours


def test_evs_before_the_llm_then_ours_matches_reference(llm, reference, hf_config) -> None:
    """EVS per request (vLLM's EVS in the processor: the prompt gets shorter), then the
    in-LLM schedule on what is left. The reference runs the video's full prompt and drops
    EVS's tokens before block 0 - the same rows - so tokens agree and kept positions map
    one to one (served prompt position -> full prompt position)."""
    video = random_video(16, seed=7)
    video[8:12] = video[7]  # four static frames: EVS should drop their tokens first
    options = {"evs_rate": 0.5, "budget": 0.5}
    out = llm.generate([video_prompt(video, options=options)], params())[0]
    full = llm.generate([video_prompt(video, options={"enabled": False})], params())[0]
    ours = kept_of(engine_state(llm), out.request_id)
    pixels = [frames_to_pixel_values(video, hf_config.force_image_size, hf_config.norm_mean, hf_config.norm_std)]
    tokens, _, kept = reference.greedy(
        full.prompt_token_ids, pixels, parse(GLOBAL).with_overrides(options), DECODE_TOKENS
    )
    assert list(out.outputs[0].token_ids) == tokens
    visual = [i for i, t in enumerate(full.prompt_token_ids) if t == reference.image_context_id]
    assert len(ours[0]) == len(kept[0]) == len(visual) // 2  # int(N * (1 - 0.5)) enter the LLM
    assert len(full.prompt_token_ids) - len(out.prompt_token_ids) == len(visual) // 2
    to_full = dict(zip(ours[0], kept[0].tolist(), strict=True))
    assert [[to_full[p] for p in stage] for stage in ours] == [k.tolist() for k in kept]
    static = set(visual[8 * 4 + 4 : 12 * 4])  # tokens of frames 9-12 (1-based), identical to their predecessor
    assert not static & set(kept[0].tolist())


@pytest.mark.parametrize("frames,options", [(6, {"budget": 0.25})], ids=["floor"])
def test_boundaries_without_drops_match_reference(llm, reference, hf_config, frames, options) -> None:
    """A boundary where no request drops anything (the min_keep floor flattens the tail
    of a short video) skips its selection and its stage's scoring: same tokens and kept
    positions as the reference."""
    _, ours = served_like_reference(llm, reference, hf_config, random_video(frames, seed=8), options)
    counts = [len(k) for k in ours]
    assert any(a == b for a, b in pairwise(counts)), counts  # the path under test


def _skipped_running_request(worker) -> dict:
    """In the worker: a reduced request "held" is running but not scheduled in a step (the
    runner keeps it, the scheduler skipped it); then it leaves the runner. Its dropped counts
    must survive the first step and go with the second."""
    from vllm_stateful_reduce.plan import plan_step
    from vllm_stateful_reduce.state import RequestInfo, RunnerBatch

    model = worker.model_runner.model
    stack = model.language_model.model
    stack.state.record("held", [0, 5, 9, 12])
    other = RequestInfo("other", 4, model.request_config(None), 4, 1, [1, 2, 3, 4])  # a text request decoding

    def step(live: set[str]) -> dict:
        model.set_batch(RunnerBatch((other,), live=frozenset(live)))
        stages = len(stack.boundaries) + 1
        plan = plan_step(stack.batch.requests, stack.state.dropped, stack.prompt_markers, stack._schedule, stages)
        stack._record_plan(plan)
        model.set_batch(RunnerBatch())
        return dict(stack.state.dropped)

    return {"skipped": step({"held", "other"}), "left": step({"other"})}


def test_a_running_request_skipped_for_a_step_keeps_its_dropped_counts(llm) -> None:
    """vLLM takes a running request that is not scheduled in a step out of the runner's input
    batch but keeps it; its later decode steps read a compacted KV layout, so its dropped
    counts must outlive the step (they were forgotten with every step's batch)."""
    seen = llm.llm_engine.collective_rpc(_skipped_running_request)[0]
    assert seen["skipped"].get("held") == [0, 5, 9, 12]
    assert "held" not in seen["left"]
