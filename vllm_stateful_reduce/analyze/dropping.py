"""What dropped tokens leave behind: one kept set of visual tokens, the rest removed after
block l (stateful: blocks 0..l, Mamba scans among them, saw the dropped tokens, and the
kept rows carry what they took in) or before the language model (stateless, l = -1).

The kept set is the method's choice on the unreduced forward: the top keep * N visual
tokens by the unified score summed over the scoring blocks, so it is the same for every l.
"""

import math
import statistics
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..config import ReductionConfig
from ..schedule import SCORING_KINDS
from ..testing.oracle import ReferenceNanoVL, unified_scores
from .items import Item
from .scores import Forward, keep_count, mean_stderr


@dataclass(frozen=True)
class Dropped:
    """One item, per drop point l = -1 (before the LLM), 0, ..., L-1 (after the last block: nothing lost)."""

    loglik: list[float]  # answer log-likelihood, teacher forced (nan without an answer)
    correct: list[bool]  # every answer token is the argmax
    features: list[torch.Tensor]  # final-norm hidden state at the last prompt row (hidden,)
    probe_label: int | None  # colour of the latest dropped object token (None: none, or not known)


def kept_tokens(fw: Forward, config: ReductionConfig, keep: float) -> torch.Tensor:
    """Indices (into the visual tokens, ascending) of the top keep * N by the method's unified
    score: per block normalised as `score_norm` says, summed over the blocks `score_layers` uses."""
    total = torch.zeros(len(fw.visual))
    for name, s in fw.scores.items():
        kind = SCORING_KINDS["*" if name.startswith("A") else "M"]
        if config.score_layers in ("all", kind):
            total += unified_scores(s, config.score_norm)
    return torch.topk(total, keep_count(len(fw.visual), keep)).indices.sort().values


def _staying_rows(fw: Forward, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dropped visual tokens, rows that stay) as masks, for a kept set."""
    dropped = torch.ones(len(fw.visual), dtype=torch.bool)
    dropped[kept] = False
    stay = torch.ones(len(fw.states[0]), dtype=torch.bool)
    stay[fw.visual[dropped]] = False
    return dropped, stay


def _continue(model: ReferenceNanoVL, fw: Forward, stay: torch.Tensor, start: int) -> torch.Tensor:
    """Final-norm hidden states of the rows in `stay`, from block `start`'s input on."""
    h = fw.states[start][stay]
    for i in range(start, len(model.pattern)):
        h = model.run_block(i, h)
    return model.lm.model.norm_f(h)


def _answer_logits(model: ReferenceNanoVL, h: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """(answer tokens, vocab) logits of the rows that predict the answer (teacher forced)."""
    return model.lm.lm_head(h[len(h) - len(answer) - 1 : -1])


@torch.inference_mode()
def answered(model: ReferenceNanoVL, item: Item, fw: Forward, kept: torch.Tensor, start: int = 0) -> bool:
    """Whether every answer token is still the argmax with the visual tokens outside
    `kept` removed from block `start`'s input on (0: before the language model, so no
    block saw them - stateless; len(pattern): nothing removed)."""
    h = _continue(model, fw, _staying_rows(fw, kept)[1], start)
    answer = torch.tensor(item.answer, dtype=torch.long)
    return bool((_answer_logits(model, h, answer).argmax(-1) == answer).all())


@torch.inference_mode()
def drop_at_each_block(model: ReferenceNanoVL, item: Item, fw: Forward, kept: torch.Tensor) -> Dropped:
    """Continue from each block's input with the dropped visual rows removed."""
    dropped, stay = _staying_rows(fw, kept)
    answer = torch.tensor(item.answer, dtype=torch.long)
    loglik, correct, features = [], [], []
    for start in range(len(model.pattern) + 1):  # start = l + 1: the first block without the dropped rows
        h = _continue(model, fw, stay, start)
        features.append(h[len(h) - len(answer) - 1])  # the last prompt row
        if len(answer):
            logprobs = _answer_logits(model, h, answer).log_softmax(-1)
            loglik.append(float(logprobs.gather(1, answer[:, None]).sum()))
            correct.append(bool((logprobs.argmax(-1) == answer).all()))
        else:
            loglik.append(math.nan)
            correct.append(False)
    objects = [v for v in dropped.nonzero().flatten().tolist() if item.colours and item.colours[v] >= 0]
    return Dropped(loglik, correct, features, item.colours[objects[-1]] if objects else None)


def probe_accuracy(features: list[torch.Tensor], labels: list[int], folds: int = 5) -> dict[str, float]:
    """Cross-validated accuracy of a linear (logistic) probe, with its binomial standard
    error and the majority-class rate it must beat."""
    x = torch.stack(features).double().numpy()
    y = np.array(labels)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
    predicted = cross_val_predict(probe, x, y, cv=KFold(folds, shuffle=True, random_state=0))
    accuracy = float((predicted == y).mean())
    return {
        "accuracy": accuracy,
        "stderr": math.sqrt(accuracy * (1 - accuracy) / len(y)),
        "chance": float(np.bincount(y).max() / len(y)),
        "n": len(y),
    }


def summarise(results: list[Dropped], pattern: str) -> dict[str, object]:
    """Per drop point: log-likelihood, its paired difference from stateless, accuracy, and
    the probe for the dropped object's colour (items that have one)."""
    points = range(len(pattern) + 1)
    answered = [r for r in results if not math.isnan(r.loglik[0])]
    probed = [r for r in results if r.probe_label is not None]
    labels = [r.probe_label for r in probed if r.probe_label is not None]
    enough = len(probed) >= 10 and len(set(labels)) > 1
    out: dict[str, object] = {
        "drop_after": [p - 1 for p in points],  # -1: before the language model (stateless)
        "block_kind": ["input", *pattern],
        "items": len(answered),
        "probe_items": len(probed),
    }
    if answered:
        accuracy = [statistics.mean(r.correct[p] for r in answered) for p in points]
        out |= {
            "loglik": [mean_stderr([r.loglik[p] for r in answered]) for p in points],
            "minus_stateless": [mean_stderr([r.loglik[p] - r.loglik[0] for r in answered]) for p in points],
            "accuracy": [{"mean": a, "stderr": math.sqrt(a * (1 - a) / len(answered))} for a in accuracy],
        }
    if enough:
        out["probe"] = [probe_accuracy([r.features[p] for r in probed], labels) for p in points]
    return out
