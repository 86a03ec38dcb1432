"""python -m vllm_stateful_reduce.analyze [--model DIR] [--task FAMILY [--order text-first] | --questions FILE.jsonl]
       [--items 64] [--keep 0.25] [--json PATH] [--png PATH]

(also installed as `vllm-stateful-reduce-analyze`). See the package docstring for what it measures.
"""

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..config import ReductionConfig
from ..schedule import boundary_blocks
from ..testing.encoding import Encoder
from ..testing.oracle import ReferenceNanoVL
from ..testing.tasks import FAMILIES
from .dropping import drop_at_each_block, kept_tokens, summarise
from .items import file_items, task_items
from .plots import plot_report
from .scores import block_name, sparsity, stability, target_recall, unreduced_forward

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "video-qa-small"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-stateful-reduce-analyze",
        description="Layerwise sparsity, importance stability across depth and what dropped tokens leave "
        "behind, for a checkpoint, through the plain-PyTorch reference forward.",
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint directory")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--task", choices=sorted(FAMILIES), default="short", help="procedural task family (`tasks.FAMILIES`)"
    )
    source.add_argument(
        "--questions",
        type=Path,
        help='JSONL, one {"video": path, "question": str, "answer": str?, "targets": [int]?} per line',
    )
    parser.add_argument("--items", type=int, default=64, help="held-out task examples (with --task)")
    parser.add_argument("--kind", help="only this question kind of the task family (e.g. after)")
    parser.add_argument(
        "--order",
        choices=["video-first", "text-first"],
        default="video-first",
        help="task questions after the video or before it (with --task; through the checkpoint's chat template)",
    )
    parser.add_argument(
        "--keep", type=float, default=0.25, help="kept fraction of visual tokens (top-k and the dropping analysis)"
    )
    parser.add_argument(
        "--reduction",
        type=json.loads,
        default={},
        help="reduction options for the scores and the kept set, e.g. '{\"mamba_dt\": false}'",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--png", type=Path, help="write the figure here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.keep < 1:
        parser.error(f"--keep: {args.keep} is not a fraction in (0, 1)")
    if args.items < 2:
        parser.error(f"--items: {args.items}; at least 2 are needed for a spread")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ReductionConfig(**args.reduction)
    started = time.monotonic()
    model, enc = ReferenceNanoVL(args.model), Encoder(args.model)
    items = (
        file_items(enc, args.questions)
        if args.questions
        else task_items(enc, args.items, order=args.order.replace("-", "_"), family=args.task, kind=args.kind)
    )

    forwards, dropped = [], []
    for j, item in enumerate(items):
        fw = unreduced_forward(model, item, config)
        dropped.append(drop_at_each_block(model, item, fw, kept_tokens(fw, config, args.keep)))
        forwards.append(replace(fw, states=[]))  # the hidden states are large and no longer needed
        if (j + 1) % 8 == 0 or j + 1 == len(items):
            print(f"  {j + 1}/{len(items)} questions ({time.monotonic() - started:.0f} s)", flush=True)

    report: dict[str, Any] = {
        "model": str(args.model),
        "source": str(args.questions) if args.questions else f"task {args.task} {args.kind or 'all'}, {args.order}",
        "items": len(items),
        "visual_tokens": [len(fw.visual) for fw in forwards],
        "keep": args.keep,
        "reduction": config.model_dump(mode="json"),
        "pattern": model.pattern,
        "sparsity": sparsity(forwards),
        "stability": stability(forwards, args.keep),
        "target_recall": target_recall(forwards, items, args.keep),
        "dropping": summarise(dropped, model.pattern),
    }
    report["summary"] = summary(report, boundary_blocks(model.pattern, config)[0])
    report["seconds"] = time.monotonic() - started
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.png:
        plot_report(report, args.png)
    return 0


def summary(report: dict[str, Any], first_boundary: int) -> dict[str, Any]:
    """The figures a reader looks for first; `first_boundary` is where the method first drops."""
    stab, drop = report["stability"], report["dropping"]
    n = len(stab["blocks"])
    out: dict[str, Any] = {
        "mass90_mean": sum(s["mass90"]["mean"] for s in report["sparsity"].values()) / n,
        "jaccard_adjacent_mean": sum(stab["jaccard"][i][i + 1] for i in range(n - 1)) / max(1, n - 1),
        "jaccard_first_last": stab["jaccard"][0][-1],
        "spearman_first_last": stab["spearman"][0][-1],
        "first_boundary": first_boundary,
    }
    at = first_boundary + 1  # index of "dropped after the first boundary" in the drop points
    if "loglik" in drop:
        out |= {
            "loglik_stateless": drop["loglik"][0]["mean"],
            "loglik_stateful_at_first_boundary": drop["loglik"][at]["mean"],
            "loglik_full": drop["loglik"][-1]["mean"],
            "stateful_minus_stateless_at_first_boundary": drop["minus_stateless"][at],
            "accuracy_stateless": drop["accuracy"][0]["mean"],
            "accuracy_stateful_at_first_boundary": drop["accuracy"][at]["mean"],
            "accuracy_full": drop["accuracy"][-1]["mean"],
        }
    if "probe" in drop:
        out |= {
            "probe_stateless": drop["probe"][0]["accuracy"],
            "probe_stateful_at_first_boundary": drop["probe"][at]["accuracy"],
            "probe_full": drop["probe"][-1]["accuracy"],
            "probe_chance": drop["probe"][0]["chance"],
        }
    return out


def print_report(report: dict[str, Any]) -> None:
    print(f"\n{report['items']} questions, keep {report['keep']:.0%} ({report['seconds']:.0f} s)")
    print(f"{'block':<8}{'mass50':>8}{'mass90':>8}{'entropy':>9}{'recall':>8}")
    recall = report["target_recall"]["blocks"]
    for name, s in report["sparsity"].items():
        r = f"{recall[name]['mean']:>8.3f}" if name in recall else f"{'-':>8}"
        print(f"{name:<8}{s['mass50']['mean']:>8.3f}{s['mass90']['mean']:>8.3f}{s['entropy']['mean']:>9.3f}{r}")
    drop = report["dropping"]
    if "loglik" in drop:
        print(f"\n{'dropped after':<14}{'loglik':>16}{'- stateless':>16}{'accuracy':>10}{'probe':>8}")
        for p, (d, kind) in enumerate(zip(drop["drop_after"], drop["block_kind"], strict=True)):
            ll, diff = drop["loglik"][p], drop["minus_stateless"][p]
            probe = f"{drop['probe'][p]['accuracy']:>8.3f}" if "probe" in drop else f"{'-':>8}"
            where = "(LLM input)" if d < 0 else block_name(kind, d)
            print(
                f"{where:<14}{ll['mean']:>9.3f} +-{ll['stderr']:.3f}{diff['mean']:>+9.3f} +-"
                f"{0 if math.isnan(diff['stderr']) else diff['stderr']:.3f}{drop['accuracy'][p]['mean']:>10.3f}{probe}"
            )
    print("summary:", json.dumps(report["summary"]))


if __name__ == "__main__":
    sys.exit(main())
