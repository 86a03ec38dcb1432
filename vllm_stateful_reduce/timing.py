"""Optional timers of a reduced forward's phases (`timing: true` in the global config).

Off, a phase is a shared null context (no clock, no device sync). On, each phase
synchronises the device before and after, so the figures are wall time of that
phase alone (and the forward runs a little slower: use it to measure, not to serve).
"""

import time
from contextlib import contextmanager, nullcontext

import torch

PHASES = ("plan", "metadata", "scoring", "selection", "compaction")

_OFF = nullcontext()


class PhaseTimer:
    def __init__(self, enabled: bool, device: torch.device | None = None) -> None:
        self.enabled = enabled
        self.device = device
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def clock(self) -> float:
        """Now, after the device's queued work (when on)."""
        if self.enabled:
            self._sync()
        return time.perf_counter()

    def record(self, start: float, reduced: bool, requests: int, rows: int) -> dict:
        """One forward's figures in seconds (see `ReductionState.timings`)."""
        forward = self.clock() - start
        return {"reduced": reduced, "requests": requests, "rows": rows, "forward": forward, **self.seconds}

    def phase(self, name: str):
        return self._timed(name) if self.enabled else _OFF

    @contextmanager
    def _timed(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
