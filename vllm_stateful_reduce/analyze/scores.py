"""Per-block importance of the visual tokens on the unreduced forward, and how sparse and
how stable across depth it is.

Scores are the method's own (the reference's `attention_scores` / `mamba_scores`): at an
attention block the question's softmax attention on each visual token, at a Mamba2 block
the implicit-attention proxy |C_t . B_s| dt_s without the decay (and, for comparison,
with it). Each block scores the hidden states it receives, all visual tokens present.
"""

import math
import statistics
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata

from ..config import ReductionConfig
from ..testing.oracle import ReferenceNanoVL
from .items import Item


@dataclass(frozen=True)
class Forward:
    """One item's unreduced forward: what every later analysis needs."""

    states: list[torch.Tensor]  # input of each block, then the last block's output: L+1 x (S, hidden)
    visual: torch.Tensor  # (N,) rows of the visual tokens
    scores: dict[str, torch.Tensor]  # scoring block ("M0", "A1", ...) -> (N,) scores
    decay_scores: dict[str, torch.Tensor]  # Mamba blocks, proxy with the exp(A * sum dt) decay


BLOCK_LETTER = {"*": "A", "M": "M", "-": "F"}  # attention, Mamba2, MLP (feed-forward)


def block_name(kind: str, index: int) -> str:
    return f"{BLOCK_LETTER[kind]}{index}"


@torch.inference_mode()
def unreduced_forward(model: ReferenceNanoVL, item: Item, config: ReductionConfig) -> Forward:
    """Prompt + answer through every block, scoring the visual tokens at each scoring block."""
    ids = item.prompt + item.answer
    visual, query = model.visual_and_query(ids, len(item.prompt))
    h = model.embeds(ids, [item.pixels])
    states, scores, decay = [], {}, {}
    for i, (kind, block) in enumerate(zip(model.pattern, model.lm.model.layers, strict=True)):
        states.append(h)
        if kind == "*":
            scores[block_name(kind, i)] = model.attention_scores(block, h, query, visual)
        elif kind == "M":
            scores[block_name(kind, i)] = model.mamba_scores(block, h, query, visual, config.mamba_dt, decay=False)
            decay[block_name(kind, i)] = model.mamba_scores(block, h, query, visual, config.mamba_dt, decay=True)
        h = model.run_block(i, h)
    states.append(h)
    return Forward(states, visual, scores, decay)


def mass_fraction(scores: torch.Tensor, share: float) -> float:
    """Smallest fraction of the tokens whose scores add up to `share` of the total."""
    cumulative = scores.sort(descending=True).values.cumsum(0) / scores.sum()
    needed = int(torch.searchsorted(cumulative, torch.tensor(share, dtype=cumulative.dtype))) + 1
    return min(needed, len(scores)) / len(scores)


def normalised_entropy(scores: torch.Tensor) -> float:
    """Entropy of the scores as a distribution, over its maximum log N (1 = uniform)."""
    p = scores / scores.sum()
    return float(-(p * p.clamp_min(1e-30).log()).sum() / math.log(len(p)))


def top_k(scores: torch.Tensor, k: int) -> set[int]:
    return set(torch.topk(scores, k).indices.tolist())


def keep_count(num_visual: int, keep: float) -> int:
    return max(1, round(keep * num_visual))


def mean_stderr(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.mean(values),
        "stderr": statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"),
    }


def sparsity(forwards: list[Forward]) -> dict[str, dict[str, dict[str, float]]]:
    """Per scoring block: fraction of visual tokens carrying 50% / 90% of the score mass,
    and the normalised entropy (mean and standard error over items)."""
    names = list(forwards[0].scores)
    measures = {
        "mass50": lambda s: mass_fraction(s, 0.5),
        "mass90": lambda s: mass_fraction(s, 0.9),
        "entropy": normalised_entropy,
    }
    return {
        name: {m: mean_stderr([f(fw.scores[name]) for fw in forwards]) for m, f in measures.items()} for name in names
    }


def stability(forwards: list[Forward], keep: float) -> dict[str, object]:
    """Mean top-k Jaccard overlap (k = keep * N) and Spearman rank correlation between
    every pair of scoring blocks."""
    names = list(forwards[0].scores)
    jaccard, spearman = np.zeros((len(names), len(names))), np.zeros((len(names), len(names)))
    for fw in forwards:
        k = keep_count(len(fw.visual), keep)
        tops = [top_k(fw.scores[n], k) for n in names]
        jaccard += [[len(a & b) / len(a | b) for b in tops] for a in tops]
        # Spearman's rho: Pearson's correlation of the ranks
        spearman += np.corrcoef(rankdata(torch.stack([fw.scores[n] for n in names]).double().numpy(), axis=1))
    return {
        "blocks": names,
        "jaccard": (jaccard / len(forwards)).tolist(),
        "spearman": (spearman / len(forwards)).tolist(),
    }


def target_recall(forwards: list[Forward], items: list[Item], keep: float) -> dict[str, object]:
    """Per scoring block (and Mamba block with decay): the share of the question's target
    tokens among its top keep * N, over items whose task knows them; chance is k / N."""
    known = [(fw, it) for fw, it in zip(forwards, items, strict=True) if it.targets]
    if not known:
        return {"blocks": {}, "chance": None, "items": 0}
    names = list(known[0][0].scores) + [f"{n} decay" for n in known[0][0].decay_scores]
    rows = {}
    for name in names:
        values = []
        for fw, it in known:
            scores = fw.decay_scores[name.removesuffix(" decay")] if name.endswith("decay") else fw.scores[name]
            top = top_k(scores, keep_count(len(fw.visual), keep))
            values.append(sum(t in top for t in it.targets) / len(it.targets))
        rows[name] = mean_stderr(values)
    chance = statistics.mean(keep_count(len(fw.visual), keep) / len(fw.visual) for fw, _ in known)
    return {"blocks": rows, "chance": chance, "items": len(known)}
