"""The reduction plan of one engine step, made on the host before block 0.

Every count of a reduced step follows from the prompts, the schedule and the dropped
counts of earlier steps: how many rows each request has in each stage, where its
question rows are, how many keys each stage's attention layers hold. Only *which*
visual tokens win is left to the device. So the plan is computed from host data the
runner already has (no device reads), and everything the device needs from it goes
up in one upload (`StepPlan.upload`).

Stages: stage 0 runs blocks 0..b_1, stage j runs the blocks after boundary b_j. A
*reducing* request is a fresh, whole-prompt prefill with media of a reduced modality
and rows after its last media, which score the visual tokens; it keeps `keep[j]` visual
tokens in stage j. Those rows hold the question when the user wrote it after the media;
when the question came first (the model's recipe, most OpenAI clients) they are only the
chat template's tail, and such a request is served unreduced unless
`reduce_question_before_media` asks otherwise (benchmarks/video_qa.py measured why).
A *continuing* request carries `dropped[j]` from its own reduced prefill in an earlier
step: its stage-j attention layers hold `seq_len - dropped[j]` keys.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .config import ReductionConfig
from .kernels.torch_ops import Varlen
from .schedule import Schedule
from .state import RequestInfo


@dataclass(frozen=True)
class PromptMarkers:
    """The token ids a plan reads a prompt by (fixed per checkpoint, from its tokenizer)."""

    context_token_id: int  # the id of every visual row, of images and video frames
    # special tokens other than the media ones: a user's text ends at the first one (the
    # chat template's end of turn, `<|im_end|>`); empty: every row after the media is text
    turn_end: frozenset[int] = frozenset()
    blank: frozenset[int] = frozenset()  # tokens of whitespace only: no question in them


@dataclass(frozen=True)
class Reducing:
    """A request whose prefill drops visual tokens in this step."""

    batch_index: int
    req_id: str
    visual: np.ndarray  # (V,) prompt positions of its visual tokens
    num_query: int  # scoring rows: the prompt's rows after its last media
    query: str  # what they hold: "question", or "template_tail" (the question came before the media)
    num_output: int  # rows after the prompt (a preempted request recomputes its output)
    keep: tuple[int, ...]  # visual tokens in each stage; keep[0] = all that enter the LLM
    config: ReductionConfig

    @property
    def dropped(self) -> tuple[int, ...]:
        """Visual tokens dropped by each stage, counted from the prompt's (stage 0: none)."""
        return tuple(len(self.visual) - k for k in self.keep)


@dataclass(frozen=True)
class Skip:
    """A fresh prefill with video served unreduced: why, and its visual tokens."""

    req_id: str
    reason: str  # a kind, optionally ": details" (e.g. "infeasible: ...")
    num_visual: int = 0

    @property
    def kind(self) -> str:
        """The reason without its details: what logs rate-limit and metrics count by."""
        return self.reason.split(":")[0]


@dataclass(frozen=True)
class StepPlan:
    """Counts of one step: (stages, requests) arrays in batch order."""

    scheduled: np.ndarray  # (R,) rows per request as the runner scheduled them
    computed: np.ndarray  # (R,) keys per request before this step, as the runner counts them
    rows: np.ndarray  # (stages, R) rows of each request in each stage
    num_computed: np.ndarray  # (stages, R) logical keys before this step in each stage's attention layers
    reducing: tuple[Reducing, ...]
    dropped: dict[str, list[int]]  # fresh prefills of this step: dropped per stage (to record)
    skipped: tuple[Skip, ...]  # fresh prefills with video served unreduced, and why
    disabled: tuple[Skip, ...] = ()  # fresh prefills with video whose reduction is turned off

    @property
    def num_stages(self) -> int:
        return self.rows.shape[0]

    @property
    def seq_lens(self) -> np.ndarray:
        return self.num_computed + self.rows

    @property
    def active(self) -> bool:
        """Whether any stage differs from the runner's layout (else: the plain forward)."""
        return any(self.changes(j) for j in range(self.num_stages))

    def changes(self, stage: int) -> bool:
        """Whether stage `stage`'s layout differs from what the runner scheduled."""
        return bool((self.rows[stage] != self.scheduled).any() or (self.num_computed[stage] != self.computed).any())

    def query_start_loc(self, stage: int) -> np.ndarray:
        """(R+1,) where each request's rows start in the stage's packed batch, and the total."""
        return np.concatenate([[0], np.cumsum(self.rows[stage])]).astype(np.int64)

    def upload(self, device: torch.device) -> "DevicePlan":
        return DevicePlan.of(self, device)


@dataclass(frozen=True)
class DevicePlan:
    """What the device needs of a plan, uploaded in one copy; host copies alongside.
    Per-stage arrays are stacked (stage first), so `x[stage]` is that stage's view."""

    query_start_loc: torch.Tensor  # (stages, R+1) int32
    seq_lens: torch.Tensor  # (stages, R) int32
    rows: torch.Tensor  # (stages, R) int64 rows of each request in each stage
    num_computed: torch.Tensor  # (stages, R) int64 logical position of each request's first row
    keys: list[Varlen]  # per stage, the reducing requests' prompt rows in the packed batch
    queries: Varlen  # the reducing requests' question rows, packed (same in every stage)
    query_rows: torch.Tensor  # (stages, T) int64 rows of the question rows
    keep: torch.Tensor  # (stages, R_red) int64 visual tokens each reducing request keeps
    visual_rows: torch.Tensor  # (R_red, V) int64 input rows of the visual tokens; -1 pads
    visual_positions: torch.Tensor  # (R_red, V) int64 their prompt positions; -1 pads

    @classmethod
    def of(cls, plan: StepPlan, device: torch.device) -> "DevicePlan":
        """One int64 upload; the int32 arrays lead it and become int32 in one conversion."""
        from vllm.utils.torch_utils import async_tensor_h2d

        narrow, wide = _host_arrays(plan)
        flat = np.concatenate([a.ravel() for a in (*narrow.values(), *wide.values())]).astype(np.int64)
        data = async_tensor_h2d(flat, dtype=torch.int64, device=device)
        num_narrow = sum(a.size for a in narrow.values())
        views = {**_views(narrow, data[:num_narrow].int()), **_views(wide, data[num_narrow:])}

        def varlen(host: np.ndarray, on_device: torch.Tensor) -> Varlen:
            return Varlen(tuple(host[0].tolist()), tuple(host[1].tolist()), on_device)

        return cls(
            query_start_loc=views["query_start_loc"],
            seq_lens=views["seq_lens"],
            rows=views["rows"],
            num_computed=views["num_computed"],
            keys=[varlen(narrow["keys"][j], views["keys"][j]) for j in range(plan.num_stages)],
            queries=varlen(narrow["queries"], views["queries"]),
            query_rows=views["query_rows"],
            keep=views["keep"],
            visual_rows=views["visual_rows"],
            visual_positions=views["visual_positions"],
        )


def _views(host: dict[str, np.ndarray], data: torch.Tensor) -> dict[str, torch.Tensor]:
    """`data` cut into tensors shaped like the host arrays, in order."""
    views, offset = {}, 0
    for name, array in host.items():
        views[name] = data[offset : offset + array.size].view(array.shape)
        offset += array.size
    return views


def _host_arrays(plan: StepPlan) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every integer array of the plan the device needs, by name, stage first where
    per stage: (int32 ones, int64 ones)."""
    index = [r.batch_index for r in plan.reducing]
    num_query = np.array([r.num_query for r in plan.reducing], dtype=np.int64)
    num_output = np.array([r.num_output for r in plan.reducing], dtype=np.int64)
    query_start_loc = np.concatenate([np.zeros((plan.num_stages, 1), np.int64), plan.rows.cumsum(1)], axis=1)
    starts = query_start_loc[:, :-1][:, index]  # (stages, R_red)
    prompt_rows = plan.rows[:, index] - num_output  # keys a question row can see
    first_query = starts + prompt_rows - num_query
    owner = np.repeat(np.arange(len(index)), num_query)  # the reducing request of each question row
    offset = np.arange(len(owner)) - _exclusive_cumsum(num_query)[owner]
    narrow = {
        "query_start_loc": query_start_loc,
        "seq_lens": plan.seq_lens,
        "keys": np.stack([starts, prompt_rows], axis=1),  # (stages, 2, R_red)
        "queries": np.stack([_exclusive_cumsum(num_query), num_query]).reshape(2, len(index)),
    }
    width = max((len(r.visual) for r in plan.reducing), default=0)
    rows = np.full((len(index), width), -1, dtype=np.int64)
    positions = np.full((len(index), width), -1, dtype=np.int64)
    runner_starts = _exclusive_cumsum(plan.scheduled)  # visual rows as the runner laid them out
    for i, r in enumerate(plan.reducing):
        rows[i, : len(r.visual)] = runner_starts[r.batch_index] + r.visual
        positions[i, : len(r.visual)] = r.visual
    wide = {
        "rows": plan.rows,
        "num_computed": plan.num_computed,
        "query_rows": first_query[:, owner] + offset,  # (stages, T)
        "keep": np.array([r.keep for r in plan.reducing], dtype=np.int64).reshape(len(index), plan.num_stages).T,
        "visual_rows": rows,
        "visual_positions": positions,
    }
    return narrow, wide


def _exclusive_cumsum(counts: np.ndarray) -> np.ndarray:
    return (np.cumsum(counts) - counts).astype(np.int64)


def plan_step(
    batch: Sequence[RequestInfo],
    dropped: Mapping[str, list[int]],
    markers: PromptMarkers,
    schedule_for: Callable[[ReductionConfig], Schedule],
    num_stages: int,
) -> StepPlan:
    """The step's plan from the runner's host-side counts (`plan.active` says whether
    anything differs from a plain forward)."""
    scheduled = np.array([info.num_scheduled for info in batch], dtype=np.int64)
    computed = np.array([info.num_computed for info in batch], dtype=np.int64)
    rows = np.tile(scheduled, (num_stages, 1))
    num_computed = np.tile(computed, (num_stages, 1))
    reducing: list[Reducing] = []
    fresh_dropped: dict[str, list[int]] = {}
    skipped: list[Skip] = []
    disabled: list[Skip] = []
    for i, info in enumerate(batch):
        if info.num_computed > 0:  # a later step: its drops, if its prefill reduced
            carried = list(dropped.get(info.req_id, ()))[:num_stages]
            num_computed[:, i] -= np.array(carried + [0] * (num_stages - len(carried)), dtype=np.int64)
            continue
        request = plan_prefill(i, info, markers, schedule_for)
        if isinstance(request, Skip):
            if request.reason != "no_media":
                (disabled if request.reason == "disabled" else skipped).append(request)
            fresh_dropped[info.req_id] = []
            continue
        fresh_dropped[info.req_id] = list(request.dropped)
        rows[:, i] += np.array(request.keep) - len(request.visual)
        reducing.append(request)
    return StepPlan(
        scheduled, computed, rows, num_computed, tuple(reducing), fresh_dropped, tuple(skipped), tuple(disabled)
    )


def plan_prefill(
    index: int, info: RequestInfo, markers: PromptMarkers, schedule_for: Callable[[ReductionConfig], Schedule]
) -> Reducing | Skip:
    """A fresh prefill: its reduction, or why it is served unreduced. The worker plans
    every step with it; the scheduler predicts a request's KV rows with it
    (`prefill_drops`), so the two can never disagree on a prompt they both read."""
    config = info.config
    if info.prompt_token_ids is None or not info.media:
        return Skip(info.req_id, "no_media")
    prompt = np.asarray(info.prompt_token_ids[: info.num_prompt_tokens])
    spans = [span for span in info.media if span.modality in config.modalities]
    reduced = np.zeros(len(prompt), dtype=bool)  # inside an item of a reduced modality
    for span in spans:
        reduced[span.offset : span.offset + span.length] = True
    visual = np.flatnonzero((prompt == markers.context_token_id) & reduced)

    def skip(reason: str) -> Skip:
        return Skip(info.req_id, reason, len(visual))

    if not all(span.layout_known for span in spans):
        return skip("evs_layout_unknown")
    if info.num_scheduled < info.num_prompt_tokens:
        return skip("prompt_split_across_steps")
    if not len(visual):
        kinds = sorted({span.modality for span in info.media})
        return skip(f"modality_not_reduced: {', '.join(kinds)} (stateful_reduce.modalities)")
    if not config.enabled:
        return skip("disabled")
    # the scoring rows: the prompt after the last image or video
    media_end = max(span.offset + span.length for span in info.media)
    num_query = info.num_prompt_tokens - media_end
    if num_query <= 0:
        return skip("no_text_after_video")
    asked_after = user_text_follows(prompt[media_end:], markers)
    if not asked_after and not config.reduce_question_before_media:
        return skip(
            "question_before_media: only the chat template follows the last media, and the question's own rows "
            "cannot see it (stateful_reduce.reduce_question_before_media reduces such prompts anyway)"
        )
    try:
        keep = schedule_for(config).keep_counts(len(visual), config.min_keep)
    except ValueError as err:  # a per-request budget this pattern cannot reach
        return skip(f"infeasible: {err}")
    if keep[-1] == len(visual):
        return skip("nothing_to_drop")
    num_output = info.num_scheduled - info.num_prompt_tokens
    query = "question" if asked_after else "template_tail"
    return Reducing(index, info.req_id, visual, num_query, query, num_output, (*keep,), config)


def prefill_drops(
    info: RequestInfo, markers: PromptMarkers, schedule_for: Callable[[ReductionConfig], Schedule]
) -> tuple[int, ...]:
    """Visual tokens a whole-prompt prefill of `info` drops in each stage (stage 0: none),
    or () when it would be served unreduced."""
    request = plan_prefill(0, info, markers, schedule_for)
    return () if isinstance(request, Skip) else request.dropped


def user_text_follows(tail: np.ndarray, markers: PromptMarkers) -> bool:
    """Whether the user wrote anything but whitespace after the media: a row of `tail`
    (the prompt after its last media) that is neither blank nor after the first special
    token, which ends the user's turn."""
    for token in tail.tolist():
        if token in markers.turn_end:
            return False
        if token not in markers.blank:
            return True
    return False
