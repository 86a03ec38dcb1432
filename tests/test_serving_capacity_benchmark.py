"""`benchmarks/serving_capacity.py --quick` end to end: vLLM's real scheduler and KV-cache
manager in the Nano 12B v2 VL geometry (part A), then two engines on the committed
long-video model with free_dropped_kv false and true (part B)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import REPO

pytestmark = pytest.mark.engine  # starts vLLM engines (in the subprocess)


def test_quick_run_end_to_end(tmp_path: Path) -> None:
    out_json = tmp_path / "capacity.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "serving_capacity.py"), "--quick", "--json", str(out_json)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    s = json.loads(out_json.read_text())["summary"]
    for key in (
        "sim_ratio_at_8k",
        "sim_ratio_at_32k",
        "theory_ratio_at_8k",
        "theory_ratio_at_32k",
        "block_size",
        "e2e_peak_running_ratio",
        "e2e_outputs_identical",
        "e2e_drain_time_ratio",
    ):
        assert s.get(key) is not None, (key, s)
    assert s["block_size"] == 1312, s  # vLLM's hybrid alignment for the 12B geometry
    assert s["sim_ratio_at_8k"] > 1 and s["sim_ratio_at_32k"] > 1, s
    # the real scheduler admits what the closed form says, up to decode-time block growth
    for key in ("8k", "32k"):
        assert s[f"sim_ratio_at_{key}"] == pytest.approx(s[f"theory_ratio_at_{key}"], rel=0.05), s
    assert s["e2e_outputs_identical"] is True, s  # freeing dropped rows' blocks changes no token
    assert s["e2e_peak_running_ratio"] > 1, s  # more requests held at once
    assert out_json.with_suffix(".png").stat().st_size > 10_000
    assert "Requests that fit at once" in run.stdout  # the terminal table
