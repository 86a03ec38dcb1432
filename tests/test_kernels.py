"""Run `kernel_cases.py` with TRITON_INTERPRET=1 in its own interpreter."""

import os
import subprocess
import sys
from pathlib import Path


def test_triton_kernels_interpreted() -> None:
    here = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "kernel_cases.py")],
        cwd=here.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "failed" not in run.stdout


def test_gpu_check_claims_nothing_without_a_gpu(tmp_path) -> None:
    """Here (no GPU) the one-command GPU check must say so, exit 0 and record no result."""
    import json

    out = tmp_path / "gpu_check.json"
    run = subprocess.run(
        [sys.executable, "kernels/gpu_check.py", "--json", str(out)],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "no CUDA GPU here" in run.stdout
    assert json.loads(out.read_text()) == {"gpu": None, "steps": {}, "ok": None}
