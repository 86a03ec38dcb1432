"""The plugin's log lines go wherever vLLM's go.

vLLM configures the logger `vllm` (handler, format, level; `VLLM_LOGGING_LEVEL`,
`VLLM_LOGGING_CONFIG_PATH`, `VLLM_CONFIGURE_LOGGING`) in every process it starts; a
logger outside that tree, such as `vllm_stateful_reduce.*`, falls through to Python's
unconfigured root logger, which drops INFO. `route_to_vllm()` makes the package logger
a child of `vllm`: the plugin's records take vLLM's level and handlers as they are when
the record is emitted (also after vLLM reconfigures logging in a new process), and a
logging config file can still set `vllm_stateful_reduce` apart (level, handlers,
`propagate`).

"Served unreduced" lines are per request; `ReasonRateLimit` lets the first of each
reason through and then at most one per reason every `interval` seconds, and the
next line that passes says how many were held back (the counts per reason are also
kept in the model's `reduction_state.skipped`). Under tensor parallelism only the
local first rank logs (every rank plans the same step), as with vLLM's
`scope="local"`. vLLM's `info_once` would not do: it deduplicates on the whole
message, which carries the request id, and keyed by reason alone it would report
each reason once per process lifetime.
"""

import logging
import time
from collections.abc import Callable

PACKAGE = __name__.rpartition(".")[0]  # "vllm_stateful_reduce"
UNREDUCED_INTERVAL_S = 60.0


def route_to_vllm() -> None:
    """Make `vllm` the parent of the package logger (idempotent)."""
    package, vllm_logger = logging.getLogger(PACKAGE), logging.getLogger("vllm")
    if package.parent is not vllm_logger:
        package.parent = vllm_logger
        package.setLevel(package.level)  # clears the loggers' cached effective levels


class ReasonRateLimit:
    """Per reason: the first line, then at most one per `interval` seconds."""

    def __init__(self, interval: float = UNREDUCED_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._last: dict[str, tuple[float, int]] = {}  # reason -> (time let through, held back since)

    def passes(self, reason: str) -> int | None:
        """None: hold this line back; else how many of this reason were held back before it."""
        now = self.clock()
        last, held = self._last.get(reason, (None, 0))
        if last is not None and now - last < self.interval:
            self._last[reason] = (last, held + 1)
            return None
        self._last[reason] = (now, 0)
        return held


def local_first_rank() -> bool:
    from vllm.distributed.parallel_state import is_local_first_rank

    return is_local_first_rank()


def describe(config, pattern: str) -> str:
    """The global reduction config in one line: every field, then what it means for
    this block pattern (boundaries, per-stage keep ratios)."""
    from .schedule import build_schedule

    fields = " ".join(f"{k}={v}" for k, v in config.model_dump().items())
    if not config.enabled:
        return f"token reduction off by default (per-request `enabled` can turn it on): {fields}"
    schedule = build_schedule(pattern, config)
    ratios = "/".join(f"{r:.2f}" for r in schedule.ratios)
    return (
        f"token reduction on: {fields}; {len(pattern)} blocks {pattern!r}, reduction after blocks "
        f"{schedule.boundaries}, stage keep ratios {ratios}"
    )
