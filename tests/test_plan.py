"""The host plan of a step and the device-side selection, without an engine.

Oracles: counts written out by hand from the plan's definitions, and a per-request
loop (the way the reference drops rows) for the batched top-k + compaction.
"""

import numpy as np
import torch

from vllm_stateful_reduce.config import parse
from vllm_stateful_reduce.plan import PromptMarkers, plan_step
from vllm_stateful_reduce.schedule import build_schedule
from vllm_stateful_reduce.selection import Kept, compact, top_k
from vllm_stateful_reduce.state import MediaSpan, RequestInfo

PATTERN = "M*-M-M*-M-M*-"  # boundaries after blocks 1, 6, 11: four stages
VIS = PromptMarkers(context_token_id=9)
CONFIG = parse({"min_keep": 4})


def prompt(num_frames: int, question: int) -> list[int]:
    """Frame text (3 ids), 4 visual ids per frame, `</img>` (2 ids), then the question."""
    ids = [1, 2]
    for _ in range(num_frames):
        ids += [5, 6, 7] + [VIS.context_token_id] * 4
    return ids + [8, 8] + [3] * question


def video_span(ids: list[int]) -> tuple[MediaSpan, ...]:
    """The span `prompt` gives its video: from the first frame's text to `</img>`."""
    visual = [i for i, t in enumerate(ids) if t == VIS.context_token_id]
    return (MediaSpan("video", 2, visual[-1] + 3 - 2),) if visual else ()


def info(
    req_id: str,
    ids: list[int],
    computed: int = 0,
    scheduled: int | None = None,
    config=CONFIG,
    outputs: int = 0,
    media: tuple[MediaSpan, ...] | None = None,
):
    scheduled = scheduled if scheduled is not None else len(ids) + outputs
    return RequestInfo(req_id, len(ids), config, computed, scheduled, ids, video_span(ids) if media is None else media)


def schedule_for(config):
    return build_schedule(PATTERN, config)


def test_plan_counts_per_stage() -> None:
    video = prompt(6, question=5)  # 24 visual tokens, 5 question rows
    batch = [
        info("decoding", video, computed=len(video) + 3, scheduled=1),  # reduced earlier: carries drops
        info("reduced", video),
        info("off", video, config=CONFIG.with_overrides({"enabled": False})),
        info("text", [1, 2, 3, 4]),
        info("silent", prompt(2, question=0)),  # no question after the video
        info("recompute", video, outputs=3),  # preempted: prompt + 3 outputs in one prefill
    ]
    keep = schedule_for(CONFIG).keep_counts(24, 4)
    plan = plan_step(batch, {"decoding": [0, 10, 15, 20]}, VIS, schedule_for, num_stages=4)
    assert plan.active
    assert [r.req_id for r in plan.reducing] == ["reduced", "recompute"]
    assert plan.dropped == {
        "reduced": [24 - k for k in keep],
        "off": [],
        "text": [],
        "silent": [],
        "recompute": [24 - k for k in keep],
    }
    assert [(s.req_id, s.reason, s.num_visual) for s in plan.skipped] == [("silent", "no_text_after_video", 8)]
    assert [(s.req_id, s.reason, s.num_visual) for s in plan.disabled] == [("off", "disabled", 24)]
    n = len(video)
    for j in range(4):
        assert plan.rows[j].tolist() == [
            1,
            n - 24 + keep[j],
            n,
            4,
            len(batch[4].prompt_token_ids),
            n + 3 - 24 + keep[j],
        ]
        assert plan.num_computed[j].tolist() == [n + 3 - [0, 10, 15, 20][j], 0, 0, 0, 0, 0]
    assert [plan.changes(j) for j in range(4)] == [False, True, True, True]
    device = plan.upload(torch.device("cpu"))
    for j in range(4):
        starts = np.concatenate([[0], np.cumsum(plan.rows[j])[:-1]])
        prompt_rows = [n - 24 + keep[j], n - 24 + keep[j]]  # outputs of the recompute are not keys of the question
        assert device.keys[j].starts == (starts[1], starts[5]) and device.keys[j].lengths == tuple(prompt_rows)
        want = [s + p - 5 + i for s, p in zip((starts[1], starts[5]), prompt_rows, strict=True) for i in range(5)]
        assert device.query_rows[j].tolist() == want
        assert device.seq_lens[j].tolist() == plan.seq_lens[j].tolist()
    visual = [i for i, t in enumerate(video) if t == VIS.context_token_id]
    starts0 = np.concatenate([[0], np.cumsum(plan.scheduled)[:-1]])
    assert device.visual_rows.tolist() == [[starts0[1] + v for v in visual], [starts0[5] + v for v in visual]]
    assert device.visual_positions.tolist() == [visual, visual]


def test_plain_steps_are_not_active() -> None:
    video = prompt(6, question=5)
    batch = [info("text", [1, 2, 3]), info("off", video, config=CONFIG.with_overrides({"enabled": False}))]
    plan = plan_step(batch, {}, VIS, schedule_for, num_stages=4)
    assert not plan.active and plan.dropped == {"text": [], "off": []}
    split = plan_step([info("split", video, scheduled=10)], {}, VIS, schedule_for, num_stages=4)
    assert not split.active and [s.reason for s in split.skipped] == ["prompt_split_across_steps"]


def test_question_before_media_is_served_unreduced_unless_asked() -> None:
    """A chat prompt whose question precedes the video: after the media only whitespace,
    then the template's end of turn (special id 11) and the assistant prefix."""
    tokens = PromptMarkers(context_token_id=9, turn_end=frozenset({10, 11}), blank=frozenset({12}))
    tail = [12, 11, 12, 10, 4, 4, 12]  # "\n<|im_end|>\n<|im_start|>assistant\n"
    first = prompt(6, question=0) + tail
    after = prompt(6, question=0) + [12, 3, 3, 11] + tail[2:]  # "\nQ?<|im_end|>..."
    forced = CONFIG.with_overrides({"reduce_question_before_media": True})
    batch = [info("first", first), info("after", after), info("forced", first, config=forced)]
    plan = plan_step(batch, {}, tokens, schedule_for, num_stages=4)
    assert [(s.req_id, s.kind, s.num_visual) for s in plan.skipped] == [("first", "question_before_media", 24)]
    assert [(r.req_id, r.query, r.num_query) for r in plan.reducing] == [
        ("after", "question", 4 + len(tail) - 2),
        ("forced", "template_tail", len(tail)),
    ]
    # without the tokenizer's markers every row after the media counts as the question
    assert [r.query for r in plan_step(batch[:1], {}, VIS, schedule_for, num_stages=4).reducing] == ["question"]


def test_batched_selection_matches_a_per_request_loop() -> None:
    """Three reducing requests between two plain ones; random scores; stable ties."""
    g = torch.Generator().manual_seed(0)
    layout = [
        ("plain", 7),
        ("red", (30, [2, 3, 5, 8, 9, 10, 14, 15, 20, 21, 22])),
        ("plain", 1),
        ("red", (12, [0, 1, 2, 3, 4, 5, 6])),
        ("red", (25, list(range(3, 23)))),
    ]
    starts, rows, pads = [], [], max(len(v) for kind, v in layout if kind == "red" for v in [v[1]])
    offset = 0
    for kind, spec in layout:
        length = spec if kind == "plain" else spec[0]
        if kind == "red":
            starts.append(offset)
            rows.append([offset + v for v in spec[1]] + [-1] * (pads - len(spec[1])))
        offset += length
    num_rows = offset
    visual = torch.tensor(rows)
    scores = torch.randn(visual.shape, generator=g).round(decimals=1)  # ties on purpose
    positions = torch.where(visual >= 0, visual + 1000, -1)
    counts = torch.tensor([4, 7, 9])  # the second request keeps all of its 7
    kept = Kept(visual, positions, scores)
    chosen = top_k(scores, kept.valid, counts, int(counts.max()))
    dropped = int((visual >= 0).sum() - counts.sum())
    index, after = compact(kept, chosen, num_rows, num_rows - dropped, carry_scores=True)
    # per-request loop: stable descending sort, first k, prompt order; every other row stays
    keep_rows, want_kept = set(range(num_rows)), []
    for r in range(3):
        n = int((visual[r] >= 0).sum())
        top = torch.sort(torch.sort(scores[r, :n], descending=True, stable=True).indices[: counts[r]]).values
        keep_rows -= set(visual[r, :n].tolist()) - set(visual[r, top].tolist())
        want_kept.append(visual[r, top].tolist())
    assert index.tolist() == sorted(keep_rows)
    for r in range(3):
        k = int(counts[r])
        assert index[after.rows[r, :k]].tolist() == want_kept[r]  # new rows point at the chosen old rows
        assert after.positions[r, :k].tolist() == [v + 1000 for v in want_kept[r]]
        assert torch.all(after.rows[r, k:] == -1) and torch.all(after.positions[r, k:] == -1)
        assert torch.equal(
            after.scores[r, :k],
            scores[r][torch.searchsorted(visual[r, : int((visual[r] >= 0).sum())], torch.tensor(want_kept[r]))],
        )


def test_scoring_choices_are_engine_wide() -> None:
    """The reduced stack scores and selects with the engine's config, once per step for
    every reducing request: none of those fields may become a per-request option."""
    from vllm_stateful_reduce.config import PER_REQUEST_FIELDS

    engine_wide = {"selection", "score_layers", "score_norm", "mamba_decay", "mamba_dt", "boundaries"}
    assert engine_wide <= set(CONFIG.model_fields)
    assert not engine_wide & PER_REQUEST_FIELDS
