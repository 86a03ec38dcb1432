"""What a reduced request must remember across decode steps.

After a reduced prefill, stage j's attention layers hold only the kept tokens, at
logical positions 0..L_j-1 of the request's own blocks. Every later step of that
request must use `seq_len - dropped[j]` and write its new token at
`position - dropped[j]` in stage j's layers. The counts are keyed by request id
(stable for the request's life), overwritten by any new prefill of that request
(preemption recomputes the prompt and lands in the same state), and dropped when
the request leaves the runner (finish, abort).
"""

from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import ReductionConfig


@dataclass(frozen=True)
class MediaSpan:
    """Where one image or video sits in a prompt (vLLM's placeholder range)."""

    modality: str  # "image" or "video"
    offset: int  # first prompt position of the item's tokens (its wrappers and frame text included)
    length: int
    layout_known: bool = True  # False: an EVS video whose frame layout the runner glue could not read


@dataclass(frozen=True)
class RequestInfo:
    """One row of the batch, as the runner glue hands it to the model (batch order):
    host-side counts, so the step can be planned without reading the device."""

    req_id: str
    num_prompt_tokens: int
    config: ReductionConfig
    num_computed: int  # tokens whose KV/state exist before this step
    num_scheduled: int  # tokens of this step
    prompt_token_ids: Sequence[int] | None  # the runner's own list, or the EVS layout (evs.py)
    media: tuple[MediaSpan, ...] = ()  # in prompt order


@dataclass(frozen=True)
class RunnerBatch:
    """What the runner glue hands the model before a forward."""

    requests: tuple[RequestInfo, ...] = ()  # batch order; empty for dummy / profile runs
    block_tables: tuple[Any, ...] = ()  # per KV-cache group, (R, blocks) on the device, manager blocks
    # per KV-cache group, (R,) blocks each request holds (host); empty: the runner does not say
    blocks_held: tuple[np.ndarray, ...] = ()
    # every request the runner still holds, scheduled in this step or not: a running request
    # the scheduler skips for a step keeps its dropped counts; they go when it leaves the
    # runner (finish, abort). A preempted one is recomputed as a fresh prefill, which
    # overwrites them.
    live: frozenset[str] = frozenset()


@dataclass
class ReductionState:
    dropped: dict[str, list[int]] = field(default_factory=dict)
    # why requests were served unreduced, for logs and tests: reason -> count
    skipped: Counter[str] = field(default_factory=Counter)
    # what scored the reduced prefills: "question" or "template_tail" -> count
    queries: Counter[str] = field(default_factory=Counter)
    # prompt positions of the visual tokens kept at each stage, for the most recent
    # reduced prefills (bounded; only with `record_kept`: inspection and tests)
    kept: OrderedDict[str, list[list[int]]] = field(default_factory=OrderedDict)
    max_kept_history: int = 256
    # one record per language-model forward while `timing` is on (see timing.py)
    timings: deque = field(default_factory=lambda: deque(maxlen=4096))

    def forget_all_but(self, live_req_ids: Iterable[str]) -> None:
        live = set(live_req_ids)
        for req_id in [r for r in self.dropped if r not in live]:
            del self.dropped[req_id]

    def record(self, req_id: str, dropped_per_stage: list[int]) -> None:
        if any(dropped_per_stage):
            self.dropped[req_id] = list(dropped_per_stage)
        else:
            self.dropped.pop(req_id, None)

    def record_kept(self, req_id: str, positions_per_stage: list[list[int]]) -> None:
        self.kept[req_id] = positions_per_stage
        self.kept.move_to_end(req_id)
        while len(self.kept) > self.max_kept_history:
            self.kept.popitem(last=False)
