"""One figure of the analysis report: sparsity, stability (two heatmaps), target recall,
and what dropped tokens leave behind (log-likelihood and probe per drop point)."""

from pathlib import Path
from typing import Any

from .scores import block_name

KIND_COLOUR = {"A": "tab:blue", "M": "tab:orange"}


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    _sparsity(axes[0, 0], report["sparsity"])
    for ax, key in zip(axes[0, 1:], ("jaccard", "spearman"), strict=True):
        _heatmap(fig, ax, report["stability"], key, report["keep"])
    _recall(axes[1, 0], report["target_recall"], report["keep"])
    _dropping(axes[1, 1], axes[1, 2], report["dropping"])
    fig.suptitle(f"{Path(report['model']).name}: {report['items']} questions ({report['source']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sparsity(ax, sparsity: dict[str, dict]) -> None:
    names = list(sparsity)
    x = range(len(names))
    for offset, (measure, label) in enumerate((("mass50", "50% of mass"), ("mass90", "90% of mass"))):
        ax.bar(
            [i + (offset - 0.5) * 0.4 for i in x],
            [sparsity[n][measure]["mean"] for n in names],
            width=0.4,
            yerr=[sparsity[n][measure]["stderr"] for n in names],
            label=f"tokens carrying {label}",
        )
    ax.plot(x, [sparsity[n]["entropy"]["mean"] for n in names], "k.-", label="entropy / log N")
    ax.set_xticks(list(x), names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of visual tokens")
    ax.set_title("layerwise sparsity of the scores")
    ax.legend(fontsize=8)


def _heatmap(fig, ax, stability: dict, key: str, keep: float) -> None:
    names, values = stability["blocks"], stability[key]
    image = ax.imshow(values, vmin=0 if key == "jaccard" else -1, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    for a, row in enumerate(values):
        for b, v in enumerate(row):
            ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.5 else "black")
    title = f"top-{keep:.0%} overlap (Jaccard)" if key == "jaccard" else "rank correlation (Spearman)"
    ax.set_title(f"importance across depth: {title}")
    fig.colorbar(image, ax=ax, fraction=0.046)


def _recall(ax, recall: dict, keep: float) -> None:
    rows = recall["blocks"]
    if not rows:
        ax.text(0.5, 0.5, "targets not known", ha="center", transform=ax.transAxes)
        return
    names = list(rows)
    colours = ["tab:grey" if n.endswith("decay") else KIND_COLOUR[n[0]] for n in names]
    ax.bar(names, [rows[n]["mean"] for n in names], yerr=[rows[n]["stderr"] for n in names], color=colours)
    ax.axhline(recall["chance"], color="black", ls=":", label="chance")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"recall of target tokens in the top {keep:.0%}")
    ax.set_title("which blocks find the question's objects (grey: Mamba proxy with decay)")
    ax.tick_params(axis="x", labelrotation=60)
    ax.legend(fontsize=8)


def _dropping(ax_ll, ax_probe, dropping: dict) -> None:
    points = zip(dropping["drop_after"], dropping["block_kind"], strict=True)
    labels = ["LLM in" if d < 0 else block_name(k, d) for d, k in points]
    x = list(range(len(labels)))
    if "loglik" in dropping:
        mean = [p["mean"] for p in dropping["loglik"]]
        err = [p["stderr"] for p in dropping["loglik"]]
        ax_ll.errorbar(x, mean, yerr=err, marker="o", capsize=3, label="dropped after this block")
        ax_ll.axhline(mean[0], color="tab:red", ls=":", label="stateless (dropped before the LLM)")
        ax_ll.axhline(mean[-1], color="black", ls="--", label="nothing dropped")
        ax_ll.legend(fontsize=8)
    ax_ll.set_xticks(x, labels, rotation=60)
    ax_ll.set_ylabel("answer log-likelihood")
    ax_ll.set_title("same kept tokens, dropped after block l")
    if "probe" in dropping:
        probe = dropping["probe"]
        ax_probe.errorbar(
            x, [p["accuracy"] for p in probe], yerr=[p["stderr"] for p in probe], marker="o", capsize=3, label="probe"
        )
        ax_probe.axhline(probe[0]["chance"], color="black", ls=":", label="majority class")
        ax_probe.legend(fontsize=8)
    else:
        ax_probe.text(0.5, 0.5, "colours of dropped objects not known", ha="center", transform=ax_probe.transAxes)
    ax_probe.set_xticks(x, labels, rotation=60)
    ax_probe.set_ylabel("cross-validated accuracy")
    ax_probe.set_title("linear probe at the question: colour of the latest dropped object")
