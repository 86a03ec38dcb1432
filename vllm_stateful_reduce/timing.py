"""Timers of a reduced forward's phases: the plugin's reduction work.

Every phase is clocked on the host (two clock reads; no device sync), which feeds the
`vllm:stateful_reduce_work_seconds` metric: on the CPU that is the phase's whole cost,
on a GPU the host's share (planning, metadata, kernel launches). With `timing: true`
in the global config each phase also synchronises the device before and after, so the
figures are wall time of that phase alone, device work included, and each forward's
figures are kept in `ReductionState.timings` (the forward runs a little slower: use it
to measure, not to serve).
"""

import time
from contextlib import contextmanager

import torch

PHASES = ("plan", "metadata", "scoring", "selection", "compaction")


class PhaseTimer:
    def __init__(self, enabled: bool, device: torch.device | None = None) -> None:
        self.enabled = enabled  # synchronise the device around phases
        self.device = device
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def clock(self) -> float:
        """Now, after the device's queued work (when on)."""
        self._sync()
        return time.perf_counter()

    def record(self, start: float, reduced: bool, requests: int, rows: int) -> dict:
        """One forward's figures in seconds (see `ReductionState.timings`)."""
        forward = self.clock() - start
        return {"reduced": reduced, "requests": requests, "rows": rows, "forward": forward, **self.seconds}

    @contextmanager
    def phase(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start

    def _sync(self) -> None:
        if self.enabled and self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
