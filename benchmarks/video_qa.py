"""Long-video QA accuracy under token reduction, through vLLM with the plugin.

    python benchmarks/video_qa.py [--task long] [--model DIR] [--order text-first] --json out.json --png out.png \
        [--quick]

Runs the held-out split of a `vllm_stateful_reduce.testing.tasks` family (`--task`: short,
8 frames of 64 px, on models/video-qa-small; long, 64 frames of 128 px, on
models/video-qa-long; compositional, 16 frames of 128 px, on models/video-qa-orders) with offline `LLM.generate`
for each method and budget and reports exact-match accuracy:

  full                  all visual tokens
  ours                  progressive, query-conditioned, attention + Mamba scores
  fastv                 one-shot pruning after the first attention block (FastV-style)
  pyramid               staged geometric decay at the attention blocks (PyramidDrop-style)
  random                same counts as ours, random tokens
  ours_decay            ours with the Mamba proxy's exp(A * sum dt) decay (ablation)
  ours_attention_only   ours scoring with attention blocks only (ablation)
  ours_mamba_only       ours scoring with Mamba blocks only (ablation)
  evs                   EVS-style temporal-redundancy pruning before the LLM only
  evs_ours              EVS (50%) before the LLM, then ours to the same overall budget
  stateless             the top `budget` of the visual tokens by ours' score on the unreduced forward,
                        dropped before the LLM: no block sees the others (plain-PyTorch reference,
                        `analyze.dropping`; its own full-token accuracy is reported beside it)

`--order` puts the question after the video (default) or before it, through the real chat
template; text-first requests ask `reduce_question_before_media` (the plugin serves them
unreduced by default), so every method is measured scored by the template's tail. Methods
that need a different engine-wide configuration get their own engine; the budget (and the
EVS rate) are per-request options. A budget a method cannot reach with the model's block
layout is reported as null with the reason. Per kind, the terminal table is at 25%.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_PLUGINS", "stateful_reduce")

BUDGETS = [0.5, 0.35, 0.25, 0.15]
MODELS = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL = {
    "short": MODELS / "video-qa-small",
    "long": MODELS / "video-qa-long",
    "compositional": MODELS / "video-qa-orders",
}
QUICK_METHODS = ["fastv", "random", "ours_attention_only"]  # besides ours (which also hosts full and evs)
PAIRED = ("full", "fastv", "pyramid", "random", "stateless", "evs", "evs_ours", "ours_decay")  # ours@25% minus each


def method_configs(pattern: str) -> dict[str, dict]:
    """Engine-wide reduction settings per method (the budget comes per request)."""
    attention = [i for i, k in enumerate(pattern) if k == "*"]
    ours = {"min_keep": 1}  # the plugin's defaults: sigmoid schedule, boundaries after attention blocks
    return {
        "ours": ours,
        "fastv": {"boundaries": [attention[0]], "schedule": "step", "score_layers": "attention", "min_keep": 1},
        "pyramid": {"boundaries": attention, "schedule": "geometric", "min_keep": 1},
        "random": ours | {"selection": "random"},
        "ours_decay": ours | {"mamba_decay": True},
        "ours_attention_only": ours | {"score_layers": "attention"},
        "ours_mamba_only": ours | {"score_layers": "mamba"},
    }


def evs_only(budget: float) -> dict:
    """EVS before the LLM keeps `budget` of the visual tokens; no in-LLM reduction."""
    return {"evs_rate": 1.0 - budget, "budget": 1.0}


def evs_then_ours(budget: float) -> dict:
    """EVS drops half before the LLM, ours reaches the overall budget inside it."""
    return {"evs_rate": 0.5, "budget": min(1.0, 2.0 * budget)}


def engine_length(model: Path, examples: list, order: str) -> int:
    """max_model_len for the task's prompts: the longest one plus room for the answer, in
    512-token steps, at least 2,048 (both families fit in 2,048 today)."""
    from vllm_stateful_reduce.testing.encoding import Encoder

    encoder = Encoder(model)
    return max(2048, 512 * math.ceil((max(len(encoder.prompt_ids(e, order)) for e in examples) + 16) / 512))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(DEFAULT_MODEL), default="short", help="task family")
    parser.add_argument("--model", type=Path, help="checkpoint (default: the task's committed model)")
    parser.add_argument("--examples", type=int, default=400, help="held-out examples (the family's kinds in turn)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="ours, fastv, random, ours_attention_only, evs and stateless at 25%% on 80 examples (~3 min)",
    )
    parser.add_argument(
        "--order",
        choices=["video-first", "text-first"],
        default="video-first",
        help="where the question stands: after the video (this project's prompts) or before it (the model's "
        "recipe and most OpenAI clients)",
    )
    parser.add_argument("--methods", help="comma-separated in-LLM methods to run besides ours (default: all)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    from vllm_stateful_reduce import REQUIRED_ENGINE_ARGS
    from vllm_stateful_reduce.config import parse
    from vllm_stateful_reduce.media import video_metadata
    from vllm_stateful_reduce.model.hf_config import NemotronNanoVLConfig
    from vllm_stateful_reduce.schedule import build_schedule
    from vllm_stateful_reduce.testing.tasks import FAMILIES, TEST_SEEDS, chance_accuracy, make_example
    from vllm_stateful_reduce.testing.tokenizer import chat_prompt

    n = 80 if args.quick else args.examples
    budgets = [0.25] if args.quick else BUDGETS
    args.model = args.model or DEFAULT_MODEL[args.task]
    model_config = NemotronNanoVLConfig.from_pretrained(args.model)
    if model_config.force_image_size != FAMILIES[args.task].size:
        parser.error(
            f"--model {args.model} reads {model_config.force_image_size} px frames; "
            f"--task {args.task} has {FAMILIES[args.task].size} px frames"
        )
    pattern = model_config.text_config.hybrid_override_pattern
    configs = method_configs(pattern)
    chosen = args.methods.split(",") if args.methods else QUICK_METHODS if args.quick else list(configs)
    if unknown := set(chosen) - set(configs):
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {sorted(configs)}")
    configs = {k: configs[k] for k in configs if k == "ours" or k in chosen}
    examples = [make_example(s, family=args.task) for s in TEST_SEEDS[:n]]
    order = args.order.replace("-", "_")
    length = engine_length(args.model, examples, order)
    prompts = [
        {
            "prompt": chat_prompt(e.question, order=order),
            "multi_modal_data": {"video": (e.frames, video_metadata(len(e.frames)))},
        }
        for e in examples
    ]
    params = SamplingParams(max_tokens=4, temperature=0.0)
    asked = {"reduce_question_before_media": True} if order == "text_first" else {}

    def accuracy(llm, options: dict) -> dict:
        requests = [p | {"mm_processor_kwargs": {"stateful_reduce": options | asked}} for p in prompts]
        outs = llm.generate(requests, params, use_tqdm=False)
        return scored([o.outputs[0].text.strip() == e.answer for o, e in zip(outs, examples, strict=True)], examples)

    results: dict[str, dict] = {}
    started = time.monotonic()
    print(f"[0/{len(configs)}] stateless, through the reference ({len(examples)} examples)", flush=True)
    results["stateless"], results["reference_full"] = stateless(args.model, order, examples, budgets)
    print(
        "  stateless: "
        + ", ".join(f"{b:.0%} {results['stateless'][str(b)]['accuracy']:.3f}" for b in budgets)
        + f"; the reference's full tokens {results['reference_full']['1.0']['accuracy']:.3f}",
        flush=True,
    )
    for i, (method, config) in enumerate(configs.items()):
        print(f"[{i + 1}/{len(configs)}] {method}: starting an engine ({time.monotonic() - started:.0f} s)", flush=True)
        llm = LLM(
            str(args.model),
            max_model_len=length,
            max_num_batched_tokens=length,
            gpu_memory_utilization=0.3,
            limit_mm_per_prompt={"video": 1},
            additional_config={"stateful_reduce": config | {"budget": 1.0}},
            seed=0,
            **REQUIRED_ENGINE_ARGS,
        )
        if method == "ours":  # methods that differ from ours only per request share its engine
            results["full"] = {"1.0": accuracy(llm, {"enabled": False})}
            print(f"  full: {results['full']['1.0']['accuracy']:.3f}", flush=True)
            for name, options in (("evs", evs_only), ("evs_ours", evs_then_ours)):
                if args.quick and name == "evs_ours":
                    continue
                results[name] = {str(b): accuracy(llm, options(b)) for b in budgets}
                print(
                    f"  {name}: " + ", ".join(f"{b:.0%} {results[name][str(b)]['accuracy']:.3f}" for b in budgets),
                    flush=True,
                )
        results[method] = {}
        for b in budgets:
            try:
                build_schedule(pattern, parse(config | {"budget": b}))
            except ValueError as err:
                results[method][str(b)] = {"accuracy": None, "reason": str(err)}
                print(f"  {method} @ {b:.0%}: not reachable ({err})", flush=True)
                continue
            results[method][str(b)] = accuracy(llm, {"budget": b})
            print(f"  {method} @ {b:.0%}: {results[method][str(b)]['accuracy']:.3f}", flush=True)
        llm.llm_engine.engine_core.shutdown()
        del llm

    at = lambda m, b="0.25": results.get(m, {}).get(b, {}).get("accuracy")  # noqa: E731
    summary = {
        "full_accuracy": at("full", "1.0"),
        "ours_25_accuracy": at("ours"),
        "fastv_25_accuracy": at("fastv"),
        "pyramid_25_accuracy": at("pyramid"),
        "random_25_accuracy": at("random"),
        "evs_25_accuracy": at("evs"),
        "evs_ours_25_accuracy": at("evs_ours"),
        "stateless_25_accuracy": at("stateless"),
        "ours_attention_only_25_accuracy": at("ours_attention_only"),
        "chance_accuracy": chance_accuracy(examples),
        # ours at 25% minus each other method, on the same examples: (mean, standard error)
        "ours_25_minus": {
            other: paired_difference(results["ours"]["0.25"], results[other][b])
            for other in PAIRED
            if results.get(other, {}).get(b := "1.0" if other == "full" else "0.25", {}).get("hits")
        },
    }
    report = {
        "model": str(args.model),
        "task": args.task,
        "order": args.order,
        "examples": n,
        "budgets": budgets,
        "pattern": pattern,
        "method_configs": configs,
        "results": results,
        "summary": summary,
    }

    print(f"\n{'method':<22}" + "".join(f"{b:>8.0%}" for b in budgets))
    print(f"{'full':<22}" + f"{at('full', '1.0'):>8.3f}" * len(budgets))
    for method in results:
        if method in ("full", "reference_full"):
            continue
        cells = [at(method, str(b)) for b in budgets]
        print(f"{method:<22}" + "".join(f"{c:>8.3f}" if c is not None else f"{'-':>8}" for c in cells))
    print(f"chance {summary['chance_accuracy']:.3f}; standard error of a cell <= {0.5 / math.sqrt(n):.3f}")
    print_per_kind(results, sorted({e.kind for e in examples}))
    print(
        "ours@25% minus (same examples, mean +- stderr): "
        + ", ".join(f"{k} {v['mean']:+.3f} +- {v['stderr']:.3f}" for k, v in summary["ours_25_minus"].items())
    )
    print(f"({time.monotonic() - started:.0f} s)")

    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.png:
        plot(report, args.png)


def scored(hits: list[bool], examples: list) -> dict:
    """Accuracy, its binomial standard error, per kind, and the per-example hits (for
    paired comparisons between methods)."""
    acc = sum(hits) / len(hits)
    return {
        "accuracy": acc,
        "stderr": math.sqrt(acc * (1 - acc) / len(hits)),
        "per_kind": {
            k: statistics.mean(h for h, e in zip(hits, examples, strict=True) if e.kind == k)
            for k in sorted({e.kind for e in examples})
        },
        "n": len(hits),
        "hits": [int(h) for h in hits],
    }


def stateless(model: Path, order: str, examples: list, budgets: list[float]) -> tuple[dict, dict]:
    """The stateless arm per budget, and the reference's own full-token accuracy: ours'
    unified score (the plugin's defaults) on the reference's unreduced forward, the top
    `budget` of the visual tokens kept and the rest dropped before block 0. An answer is
    right when every answer token (and the end of turn) is the argmax, teacher forced -
    what greedy decoding of exactly the answer needs."""
    import torch

    from vllm_stateful_reduce.analyze.dropping import answered, kept_tokens
    from vllm_stateful_reduce.analyze.items import example_items
    from vllm_stateful_reduce.analyze.scores import unreduced_forward
    from vllm_stateful_reduce.config import ReductionConfig
    from vllm_stateful_reduce.testing.encoding import Encoder
    from vllm_stateful_reduce.testing.oracle import ReferenceNanoVL

    reference, config = ReferenceNanoVL(model), ReductionConfig()
    items = example_items(Encoder(model), examples, order)
    hits: dict[str, list[bool]] = {str(b): [] for b in [1.0, *budgets]}
    for item in items:
        fw = unreduced_forward(reference, item, config)
        everything = torch.arange(len(fw.visual))
        hits["1.0"].append(answered(reference, item, fw, everything, start=len(reference.pattern)))
        for b in budgets:
            hits[str(b)].append(answered(reference, item, fw, kept_tokens(fw, config, b)))
    full = {"1.0": scored(hits.pop("1.0"), examples)}
    return {b: scored(h, examples) for b, h in hits.items()}, full


def print_per_kind(results: dict, kinds: list[str]) -> None:
    """Accuracy per question kind at 25% (full: all tokens)."""
    print(f"\nper kind at 25%{'':<7}" + "".join(f"{k:>11}" for k in kinds))
    for method, by_budget in results.items():
        cell = by_budget.get("1.0" if method in ("full", "reference_full") else "0.25", {})
        if cell.get("per_kind"):
            print(f"{method:<22}" + "".join(f"{cell['per_kind'][k]:>11.3f}" for k in kinds))


def paired_difference(a: dict, b: dict) -> dict:
    """Mean of a's minus b's per-example hits, with the paired standard error."""
    diff = [x - y for x, y in zip(a["hits"], b["hits"], strict=True)]
    return {"mean": statistics.mean(diff), "stderr": statistics.stdev(diff) / math.sqrt(len(diff))}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    budgets = report["budgets"]
    for method, by_budget in report["results"].items():
        if method == "reference_full":
            continue
        if method == "full":
            ax.axhline(by_budget["1.0"]["accuracy"], color="black", ls="--", label="full tokens")
            continue
        points = [(b, by_budget[str(b)]["accuracy"]) for b in budgets if by_budget[str(b)]["accuracy"] is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=method)
    ax.axhline(report["summary"]["chance_accuracy"], color="grey", ls=":", label="chance")
    ax.set_xlabel("visual-token budget (depth-averaged fraction)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(f"video QA ({report['task']} task), {report['examples']} held-out examples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
