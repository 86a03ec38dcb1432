"""The scheduler's side of freeing KV (adapter/kv_stages.py), without an engine: vLLM's
real spec grouping, and the property that makes fewer blocks safe.

Property: over random prompts, per-request options, EVS rates and prompts split across
steps, the rows the scheduler sizes stage j's blocks for (`DropBook.rows`, from what
vLLM's engine-core `Request` holds) are never fewer than the worker's plan writes
(`plan.plan_step`, from what the runner holds: EVS videos in their real frame layout,
options from the media's fields), and equal whenever the worker reduces.
"""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from vllm.multimodal.inputs import (
    MultiModalBatchedField,
    MultiModalFeatureSpec,
    MultiModalFieldElem,
    MultiModalKwargsItem,
    PlaceholderRange,
)
from vllm.sampling_params import SamplingParams
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.request import Request

from vllm_stateful_reduce.adapter.kv_stages import DropBook, DropPredictor, StageFullAttentionSpec
from vllm_stateful_reduce.adapter.runner_glue import media_spans, request_overrides
from vllm_stateful_reduce.config import parse
from vllm_stateful_reduce.media_fields import EVS_FIELD, OPTIONS_FIELD, encode_options, float_bits
from vllm_stateful_reduce.plan import PromptMarkers, plan_step
from vllm_stateful_reduce.schedule import build_schedule
from vllm_stateful_reduce.state import RequestInfo

PATTERN = "M*-M-M*-M-M*-"  # four stages
CONTEXT, TURN_END, BLANK = 9, 50, 51
MARKERS = PromptMarkers(CONTEXT, frozenset({TURN_END}), frozenset({BLANK}))
ENGINE = parse({"min_keep": 4})
PER_FRAME = 6  # visual tokens per frame
NUM_STAGES = 4


def spec(stage: int) -> StageFullAttentionSpec:
    return StageFullAttentionSpec(block_size=16, num_kv_heads=2, head_size=8, dtype=torch.float32, stage=stage)


def test_stage_specs_merge_only_within_a_stage() -> None:
    merged = StageFullAttentionSpec.merge([spec(2), spec(2)])
    assert type(merged) is StageFullAttentionSpec and merged.stage == 2 and merged == spec(2)
    with pytest.raises(AssertionError, match="different reduction stages"):
        StageFullAttentionSpec.merge([spec(1), spec(2)])
    plain = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=8, dtype=torch.float32)
    with pytest.raises(AssertionError):
        StageFullAttentionSpec.merge([spec(1), plain])
    assert spec(1).page_size_bytes == plain.page_size_bytes  # vLLM's page stays uniform
    assert spec(1).is_uniform_with_collection({"a": spec(1)}) and not spec(1).is_uniform_with_collection({"a": spec(2)})


# ------------------------------------------------------------------ the property


def video(rng: np.random.Generator, frames: int, retained: int | None) -> tuple[list[int], list[int]]:
    """(engine-core ids, worker ids) of one video: frame text then visual tokens per
    frame. With EVS (`retained` visual tokens) the engine core has them all in the first
    frame, the worker in the frames the vision tower chose (vLLM's EVS layout)."""

    def layout(counts: list[int]) -> list[int]:
        return [t for c in counts for t in [5, 6] + [CONTEXT] * c]

    if retained is None:
        ids = layout([PER_FRAME] * frames)
        return ids, ids
    cuts = np.sort(rng.integers(0, retained - PER_FRAME + 1, frames - 1))  # first frame keeps all
    counts = np.diff(np.concatenate([[0], cuts, [retained - PER_FRAME]])).tolist()
    counts[0] += PER_FRAME
    return layout([retained] + [0] * (frames - 1)), layout(counts)


def feature(i: int, offset: int, length: int, options: dict | None, evs: float) -> MultiModalFeatureSpec:
    field = MultiModalBatchedField()
    data = {
        OPTIONS_FIELD: MultiModalFieldElem(encode_options(options), field),
        EVS_FIELD: MultiModalFieldElem(float_bits(torch.tensor([evs])), field),
    }
    return MultiModalFeatureSpec(MultiModalKwargsItem(data), "video", f"v{i}", PlaceholderRange(offset, length))


def kept_out(f: MultiModalFeatureSpec) -> MultiModalFeatureSpec:
    """The feature as the engine core has it when the shm cache keeps its data out."""
    return MultiModalFeatureSpec(None, f.modality, f.identifier, f.mm_position)


@dataclass(frozen=True)
class Case:
    request: Request  # as the engine core has it
    worker_features: list[MultiModalFeatureSpec]  # as the runner has them (data always there)
    worker_ids: list[int]  # EVS videos in their real frame layout
    laid_out: frozenset[str]  # EVS videos whose layout the worker read

    @property
    def options_out_of_reach(self) -> bool:
        return any(f.data is None for f in self.request.mm_features)


def random_case(rng: np.random.Generator, index: int) -> Case:
    """A random prompt with random options, as the engine core and the worker see it."""
    options = {}
    if rng.random() < 0.2:
        options["enabled"] = bool(rng.random() < 0.5)
    if rng.random() < 0.4:
        options["budget"] = float(rng.choice([0.1, 0.25, 0.5, 0.9, 1.0]))
    if rng.random() < 0.3:
        options["reduce_question_before_media"] = True
    evs = float(rng.choice([0.0, 0.0, 0.3, 0.75]))
    if evs:
        options["evs_rate"] = evs
    engine_ids, worker_ids, features, laid_out = [1, 2], [1, 2], [], []
    question = [int(t) for t in rng.integers(10, 40, rng.integers(0, 6))]
    order = rng.choice(["video_first", "text_first", "no_media"], p=[0.6, 0.3, 0.1])
    if order == "text_first":
        engine_ids, worker_ids = engine_ids + question, worker_ids + question
    for v in range(0 if order == "no_media" else int(rng.integers(1, 3))):
        frames = int(rng.integers(1, 12))
        retained = max(PER_FRAME, int(round(frames * PER_FRAME * (1 - evs)))) if evs else None
        core, worker = video(rng, frames, retained)
        features.append(feature(v, len(engine_ids), len(core), options or None, evs))
        if retained is not None:
            laid_out.append(f"v{v}")
        engine_ids, worker_ids = engine_ids + core, worker_ids + worker
    tail = ([] if order == "text_first" else question) + [int(rng.choice([BLANK, TURN_END]))] + [3, 4]
    engine_ids, worker_ids = engine_ids + tail, worker_ids + tail
    in_core = [kept_out(f) if rng.random() < 0.1 else f for f in features]
    request = Request(f"r{index}", engine_ids, SamplingParams(max_tokens=4), None, mm_features=in_core)
    return Case(request, features, worker_ids, frozenset(laid_out))


def worker_rows(case: Case, scheduled: int) -> np.ndarray:
    """(stages,) KV rows the worker's plan writes in each stage for this prefill step,
    from what the runner glue reads (runner_glue.media_spans, request_overrides)."""
    request = case.request
    config = ENGINE.with_overrides(request_overrides(case.worker_features))
    media = media_spans(case.worker_features, case.laid_out)
    info = RequestInfo(request.request_id, request.num_prompt_tokens, config, 0, scheduled, case.worker_ids, media)
    plan = plan_step([info], {}, MARKERS, lambda c: build_schedule(PATTERN, c), NUM_STAGES)
    return plan.seq_lens[:, 0]


def test_the_scheduler_never_sizes_fewer_rows_than_the_worker_writes() -> None:
    rng = np.random.default_rng(0)
    predictor = DropPredictor(ENGINE, PATTERN, MARKERS)
    reduced = split = out_of_reach = 0
    for index in range(400):
        case = random_case(rng, index)
        request = case.request
        book = DropBook({request.request_id: request})
        drops = predictor(request)
        if any(drops):
            book.predicted[request.request_id] = drops
        whole = request.num_prompt_tokens
        scheduled = whole if rng.random() < 0.8 else int(rng.integers(1, whole))  # split by the encoder budget
        ours = np.array([book.rows(request.request_id, scheduled, j) for j in range(NUM_STAGES)])
        theirs = worker_rows(case, scheduled)
        assert (ours >= theirs).all(), (index, ours, theirs)
        if (theirs < scheduled).any():  # the worker reduced
            reduced += 1
            if case.options_out_of_reach:
                out_of_reach += 1
            else:
                assert (ours == theirs).all(), (index, ours, theirs)
        split += scheduled < whole
    print(f"400 prompts: {reduced} reduced by the worker, {split} split, {out_of_reach} with options out of reach")
    assert reduced > 100 and split > 40 and out_of_reach > 0  # every branch exercised
