"""`benchmarks/video_qa.py --quick` end to end on a small random checkpoint.

Checks the machinery (engines per method, per-request budgets, JSON summary, PNG);
accuracy targets need the trained model (issue 4) and are not asserted here.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_writes_table_json_and_plot(checkpoint, tmp_path) -> None:
    out_json, out_png = tmp_path / "qa.json", tmp_path / "qa.png"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "video_qa.py"), "--quick", "--model", str(checkpoint),
         "--json", str(out_json), "--png", str(out_png)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    report = json.loads(out_json.read_text())
    summary = report["summary"]
    for key in ("full_accuracy", "ours_25_accuracy", "fastv_25_accuracy", "random_25_accuracy", "evs_25_accuracy", "chance_accuracy"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert report["results"]["ours"]["0.25"]["n"] == 80
    assert set(report["results"]["ours"]["0.25"]["per_kind"]) == {"which_frame", "count", "colour_at", "order"}
    assert "ours" in run.stdout and "chance" in run.stdout  # the terminal table
    assert out_png.stat().st_size > 10_000
