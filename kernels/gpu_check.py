"""One command for a machine with an NVIDIA GPU and vLLM's GPU build.

    pip install -e ".[test]"       # next to `pip install vllm` (the GPU build)
    python kernels/gpu_check.py --json gpu_check.json

Runs, each as its own process, and records pass/fail, counts, time and the output's tail:
1. the Triton kernel cases compiled on the GPU (`tests/kernel_cases.py` with
   VSR_KERNEL_DEVICE=cuda) against their torch references, at the real model's shapes;
2. the offline oracle tests on the GPU: reduction off vs transformers' NemotronH, the
   reduced path vs the plain-PyTorch reference in mixed batches (`tests/test_offline.py`,
   `tests/test_reduction.py`; float32, so with the TRITON_ATTN backend: FlashAttention has
   no float32), and the device audit and sync count (`tests/test_device_work.py`);
3. the processor against vLLM's in-tree Nano VL processor, which imports only where
   torchvision does (`tests/test_intree_parity.py`: tile counts, pixel values, video
   prompt ids), and images / EVS / the recipe's videos against the oracle
   (`tests/test_media_oracle.py`);
4. `benchmarks/prefill_speedup.py --quick`.
Writes one JSON with every result and exits non-zero if anything failed. Without a
CUDA GPU it says so, writes `{"gpu": null, ...}` and exits 0 without claiming anything.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]


def gpu_name() -> str | None:
    """The first CUDA device's name, or None where there is none (or no CUDA build)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def steps(json_dir: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (command, extra environment)."""
    no_interpreter = {"TRITON_INTERPRET": "0"}
    return {
        "kernels": ([*PYTEST, "tests/kernel_cases.py"], {**no_interpreter, "VSR_KERNEL_DEVICE": "cuda"}),
        "oracles": (
            [*PYTEST, "tests/test_offline.py", "tests/test_reduction.py", "tests/test_device_work.py"],
            {**no_interpreter, "VSR_TEST_ATTENTION_BACKEND": "TRITON_ATTN"},
        ),
        "processor": (
            [*PYTEST, "-rs", "tests/test_intree_parity.py", "tests/test_media_oracle.py"],
            {**no_interpreter, "VSR_TEST_ATTENTION_BACKEND": "TRITON_ATTN"},
        ),
        "benchmark": (
            [
                sys.executable,
                "benchmarks/prefill_speedup.py",
                "--quick",
                "--json",
                str(json_dir / "prefill_quick.json"),
            ],
            no_interpreter,
        ),
    }


def pytest_counts(output: str) -> dict[str, int]:
    """{"passed": n, "failed": n, ...} from pytest's closing line."""
    return {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", output)}


def run_step(command: list[str], env: dict[str, str]) -> dict:
    start = time.monotonic()
    run = subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    output = run.stdout + run.stderr
    return {
        "command": " ".join(command),
        "returncode": run.returncode,
        "ok": run.returncode == 0,
        "seconds": round(time.monotonic() - start, 1),
        "counts": pytest_counts(run.stdout),
        "tail": output[-4000:],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=ROOT / "artifacts" / "gpu_check.json")
    parser.add_argument("--skip-benchmark", action="store_true", help="kernels and oracles only")
    args = parser.parse_args()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    name = gpu_name()
    report: dict = {"gpu": name, "steps": {}, "ok": True}
    if name is None:
        print("gpu_check: no CUDA GPU here (or no CUDA build of torch): nothing was checked, nothing is claimed.")
        args.json.write_text(json.dumps({**report, "ok": None}, indent=1))
        return 0
    import vllm

    report["vllm"] = vllm.__version__
    for step, (command, env) in steps(args.json.parent).items():
        if step == "benchmark" and args.skip_benchmark:
            continue
        print(f"gpu_check: {step} ...", flush=True)
        result = run_step(command, env)
        report["steps"][step] = result
        report["ok"] &= result["ok"]
        print(f"gpu_check: {step} {'ok' if result['ok'] else 'FAILED'} in {result['seconds']} s {result['counts']}")
        args.json.write_text(json.dumps(report, indent=1))  # what ran so far, if a later step hangs
    print(f"gpu_check on {name}: {'all passed' if report['ok'] else 'FAILURES'}; details in {args.json}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
