"""Which scores find what the question asks about: per block, the share of the
question's target tokens among a block's top-k visual tokens.

    python benchmarks/score_recall.py [--model models/video-qa-small] --json out.json --png out.png [--quick]

The tasks know which visual tokens hold the objects a question names (`Example.targets`).
For every scoring block of the model, on held-out examples, this ranks the visual
tokens by the attention score (attention blocks) and by the Mamba2 proxy with and
without the exp(A * sum dt) decay (Mamba blocks) - exactly the reference's scoring,
on the unreduced forward - and reports recall@k of the targets, against the chance
value k / N. It explains the end-to-end numbers of `video_qa.py` block by block.
"""

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from vllm_stateful_reduce.testing.encoding import Encoder
from vllm_stateful_reduce.testing.oracle import ReferenceNanoVL
from vllm_stateful_reduce.testing.tasks import TEST_SEEDS, make_example


@torch.no_grad()
def block_scores(model: ReferenceNanoVL, enc: Encoder, example) -> dict[str, torch.Tensor]:
    """Scores of the visual tokens per block and variant, e.g. 'A1', 'M3', 'M3 decay'."""
    ids = enc.prompt_ids(example)
    visual, query = model.visual_and_query(ids, len(ids))
    h, out = model._embeds(ids, [enc.pixels(example)]), {}
    for i, (kind, block) in enumerate(zip(model.pattern, model.lm.model.layers, strict=True)):
        if kind == "*":
            out[f"A{i}"] = model._attention_scores(block, h, query, visual)
        elif kind == "M":
            out[f"M{i}"] = model._mamba_scores(block, h, query, visual, use_dt=True, decay=False)
            out[f"M{i} decay"] = model._mamba_scores(block, h, query, visual, use_dt=True, decay=True)
        h = model.run_block(i, h)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", type=Path, default=Path(__file__).resolve().parent.parent / "models" / "video-qa-small"
    )
    parser.add_argument("--examples", type=int, default=240)
    parser.add_argument("--k", type=int, default=4, help="top-k visual tokens (default: one frame's worth)")
    parser.add_argument("--quick", action="store_true", help="40 examples")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args()

    model, enc = ReferenceNanoVL(args.model), Encoder(args.model)
    n = 40 if args.quick else args.examples
    recall: dict[str, list[float]] = {}
    num_visual = None
    for j, seed in enumerate(TEST_SEEDS[:n]):
        example = make_example(seed)
        if not example.targets:  # "how many: 0" names no object
            continue
        for name, scores in block_scores(model, enc, example).items():
            top = set(torch.topk(scores, args.k).indices.tolist())
            recall.setdefault(name, []).append(sum(t in top for t in example.targets) / len(example.targets))
            num_visual = len(scores)
        if (j + 1) % 20 == 0:
            print(f"  {j + 1}/{n} examples", flush=True)
    chance = args.k / num_visual
    rows = {
        name: {"recall": statistics.mean(v), "stderr": statistics.stdev(v) / math.sqrt(len(v)), "n": len(v)}
        for name, v in recall.items()
    }
    print(f"\nrecall@{args.k} of the question's target tokens among {num_visual} visual tokens (chance {chance:.3f})")
    for name, r in rows.items():
        print(f"  {name:<10} {r['recall']:.3f} +- {r['stderr']:.3f}")
    report = {
        "model": str(args.model),
        "examples": n,
        "k": args.k,
        "num_visual": num_visual,
        "chance": chance,
        "blocks": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.png:
        plot(report, args.png)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["blocks"])
    fig, ax = plt.subplots(figsize=(8, 4))
    colours = ["tab:blue" if n.startswith("A") else "tab:grey" if "decay" in n else "tab:orange" for n in names]
    ax.bar(
        names,
        [report["blocks"][n]["recall"] for n in names],
        yerr=[report["blocks"][n]["stderr"] for n in names],
        color=colours,
    )
    ax.axhline(report["chance"], color="black", ls=":", label="chance (random tokens)")
    ax.set_ylabel(f"recall@{report['k']} of target tokens")
    ax.set_title("per-block scores: attention (blue), Mamba proxy (orange), with decay (grey)")
    ax.tick_params(axis="x", labelrotation=60)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
