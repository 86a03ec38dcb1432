"""Micro-benchmark of the hot-path kernels at Nemotron Nano 12B v2 VL shapes.

    python kernels/bench_kernels.py [--quick] [--reps 10] [--json out.json] [--png out.png]

Kernels: `gather_rows` of bf16 hidden states 5120 wide, `attention_scores` (40 query /
8 KV heads x 128) and `mamba_scores` (8 groups x state 128), on a 32k-token batch of
1 or 4 requests with 30 query rows each, scoring 24k visual rows in all.

With a CUDA GPU (torch.cuda.is_available()) it times the Triton kernel and the torch
reference on the GPU and reports the Triton result's max error against the reference
(the GPU check of the bf16 tensor-core path, which TRITON_INTERPRET cannot run).
Without one it times only the torch reference on the CPU and says so in the output
and the JSON: no Triton number is ever reported for a run that had no GPU.
`--quick` uses a 4k-token batch (under a minute on a 2-core CPU).
"""

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_stateful_reduce.kernels import torch_ops
from vllm_stateful_reduce.kernels.torch_ops import Varlen

HIDDEN, HQ, HK, HEAD_DIM, GROUPS, STATE = 5120, 40, 8, 128, 8, 128  # Nemotron Nano 12B v2 VL
QUERY_ROWS = 30  # text after the last visual token, per request
KEPT = 0.75  # share of the batch's rows gathered / scored (visual rows)


@dataclass
class Case:
    """One kernel call: `run(impl)` calls `impl.<kernel>` on inputs already on the device."""

    kernel: str
    label: str
    run: Callable[[object], torch.Tensor]


def _segments(tokens: int, requests: int, device: torch.device) -> tuple[Varlen, Varlen, torch.Tensor]:
    """Query / key tables of `requests` equal requests packed into `tokens` rows, and the
    scored rows: a visual span of KEPT x its length after a short text prefix, per request."""
    per = tokens // requests
    visual = int(per * KEPT)
    k_starts = [r * per for r in range(requests)]
    keys = Varlen.of(k_starts, [per] * requests, device)
    queries = Varlen.of([r * QUERY_ROWS for r in range(requests)], [QUERY_ROWS] * requests, device)
    prefix = (per - QUERY_ROWS - visual) // 2
    v_rows = torch.stack([torch.arange(k0 + prefix, k0 + prefix + visual) for k0 in k_starts]).to(device)
    return queries, keys, v_rows  # v_rows: (R, visual) int64


def make_cases(tokens: int, device: torch.device) -> list[Case]:
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=torch.bfloat16)

    hidden = randn(tokens, HIDDEN)
    kept = torch.sort(torch.randperm(tokens, generator=g)[: int(tokens * KEPT)]).values.to(device)
    cases = [Case("gather_rows", f"{len(kept)} of {tokens} rows x {HIDDEN}", lambda m: m.gather_rows(hidden, kept))]
    k, b = randn(tokens, HK, HEAD_DIM), randn(tokens, GROUPS, STATE)
    weight = torch.rand(tokens, GROUPS, generator=g).to(device)  # summed dt, float32
    for requests in (1, 4):
        queries, keys, v_rows = _segments(tokens, requests, device)
        q, c = randn(requests * QUERY_ROWS, HQ, HEAD_DIM), randn(requests * QUERY_ROWS, GROUPS, STATE)
        label = f"{requests} req, {tokens} keys, {v_rows.numel()} scored"
        cases.append(
            Case(
                "attention_scores",
                label,
                lambda m, q=q, queries=queries, keys=keys, v_rows=v_rows: m.attention_scores(
                    q, k, queries, keys, v_rows, HEAD_DIM**-0.5
                ),
            )
        )
        cases.append(
            Case(
                "mamba_scores",
                label,
                lambda m, c=c, queries=queries, v_rows=v_rows: m.mamba_scores(c, b, weight, queries, v_rows),
            )
        )
    return cases


def time_ms(fn: Callable[[], torch.Tensor], reps: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Wall time per call with the device synchronised around each one (first calls compile / warm caches)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def max_error(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    err = (ours.float() - ref.float()).abs().max().item()
    return {"max_abs_err": err, "max_rel_err": err / max(ref.float().abs().max().item(), 1e-30)}


def run(args: argparse.Namespace) -> dict:
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    impls: dict[str, object] = {"reference": torch_ops}
    if gpu:
        from vllm_stateful_reduce.kernels import triton_kernels

        impls["triton"] = triton_kernels
        where = f"GPU {torch.cuda.get_device_name(device)}: Triton kernels vs the torch reference"
    else:
        where = "no CUDA GPU: only the torch reference was timed, on the CPU; Triton kernels were NOT timed"
    print(where, flush=True)
    tokens = 4096 if args.quick else 32768
    cases = make_cases(tokens, device)
    results = []
    for i, case in enumerate(cases, 1):
        expected = case.run(torch_ops)
        for name, impl in impls.items():
            print(f"[{i}/{len(cases)}] {case.kernel} ({case.label}) {name} ...", end=" ", flush=True)
            row = {"kernel": case.kernel, "case": case.label, "impl": name, "device": device.type}
            row |= time_ms(lambda case=case, impl=impl: case.run(impl), args.reps, args.warmup, device)
            if name != "reference":
                row |= max_error(case.run(impl), expected)
            print(
                f"median {row['median_ms']:.3f} ms (min {row['min_ms']:.3f}, max {row['max_ms']:.3f})"
                + (f", max abs err {row['max_abs_err']:.2e}" if "max_abs_err" in row else ""),
                flush=True,
            )
            results.append(row)
    return {
        "gpu": gpu,
        "triton_timed": gpu,
        "note": where,
        "device": torch.cuda.get_device_name(device) if gpu else f"CPU ({platform.machine()})",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quick": args.quick,
        "tokens": tokens,
        "reps": args.reps,
        "warmup": args.warmup,
        "results": results,
    }


def plot(report: dict, path: Path) -> None:
    """Bars of median time per case, one bar per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = list(dict.fromkeys(r["impl"] for r in report["results"]))
    labels = list(dict.fromkeys(f"{r['kernel']}\n{r['case']}" for r in report["results"]))
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for n, impl in enumerate(impls):
        rows = {f"{r['kernel']}\n{r['case']}": r["median_ms"] for r in report["results"] if r["impl"] == impl}
        xs = [i + n * width for i, label in enumerate(labels) if label in rows]
        ax.bar(xs, [rows[label] for label in labels if label in rows], width, label=f"{impl} on {report['device']}")
    ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(labels))], labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("median ms per call")
    ax.set_title(report["note"], fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4k-token batch instead of 32k")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per kernel and implementation")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (Triton compiles in the first)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    report = run(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.png:
        plot(report, args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
