"""The analysis tool (`python -m vllm_stateful_reduce.analyze`): its statistics on known
inputs, its dropping forward against transformers' whole-model forward and the
reference's training forward, and the command end to end on the committed model."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from vllm_stateful_reduce.analyze.__main__ import main as analyze_main
from vllm_stateful_reduce.analyze.dropping import drop_at_each_block, kept_tokens
from vllm_stateful_reduce.analyze.items import file_items, task_items
from vllm_stateful_reduce.analyze.scores import (
    mass_fraction,
    normalised_entropy,
    stability,
    unreduced_forward,
)
from vllm_stateful_reduce.config import ReductionConfig
from vllm_stateful_reduce.testing.encoding import Encoder
from vllm_stateful_reduce.testing.oracle import ReferenceNanoVL
from vllm_stateful_reduce.testing.tasks import COLOURS, TEST_SEEDS, make_example
from vllm_stateful_reduce.testing.video_files import write_video

from .helpers import LONG_MODEL, SMALL_MODEL


def test_mass_fraction_and_entropy() -> None:
    scores = torch.tensor([1.0, 6.0, 1.0, 1.0, 1.0])
    assert mass_fraction(scores, 0.5) == 1 / 5  # the 6 alone is 60% of the mass
    assert mass_fraction(scores, 0.9) == 4 / 5  # 6 + 1 + 1 + 1 = 90%
    assert normalised_entropy(torch.ones(7)) == pytest.approx(1.0)
    assert normalised_entropy(torch.tensor([1.0, 1e-12, 1e-12])) < 1e-9


def test_stability_against_scipy(small_model: ReferenceNanoVL, small_encoder: Encoder) -> None:
    """Spearman between blocks equals scipy's spearmanr; Jaccard is symmetric with a unit
    diagonal; recomputed by hand for one pair."""
    config = ReductionConfig()
    forwards = [unreduced_forward(small_model, item, config) for item in task_items(small_encoder, 3)]
    out = stability(forwards, keep=0.25)
    names = out["blocks"]
    a, b = names.index("A1"), names.index("M3")
    expected = np.mean([spearmanr(fw.scores["A1"], fw.scores["M3"]).statistic for fw in forwards])
    assert out["spearman"][a][b] == pytest.approx(expected, abs=1e-9)
    k = 8  # 25% of 32 visual tokens
    by_hand = np.mean(
        [
            len(set(fw.scores["A1"].topk(k).indices.tolist()) & set(fw.scores["M3"].topk(k).indices.tolist()))
            / len(set(fw.scores["A1"].topk(k).indices.tolist()) | set(fw.scores["M3"].topk(k).indices.tolist()))
            for fw in forwards
        ]
    )
    assert out["jaccard"][a][b] == pytest.approx(by_hand) and out["jaccard"][b][a] == pytest.approx(by_hand)
    assert all(out["jaccard"][i][i] == pytest.approx(1.0) for i in range(len(names)))


def test_token_colours_hold_the_named_objects(small_encoder: Encoder) -> None:
    """Read back from the pixels: the token a colour_of question targets holds the answer's colour."""
    items = task_items(small_encoder, 24, kind="colour_of")
    for seed, item in zip(TEST_SEEDS, items, strict=False):
        example = make_example(seed, kind="colour_of")
        assert len(item.colours) == len(example.frames) * small_encoder.config.tokens_per_frame
        (target,) = item.targets
        assert list(COLOURS)[item.colours[target]] == example.answer
        assert sum(c >= 0 for c in item.colours) >= 1


def _loglik(logits: torch.Tensor, answer: list[int]) -> float:
    """Answer log-likelihood from full-sequence logits whose last len(answer) + 1 rows predict it."""
    lp = logits[-len(answer) - 1 : -1].log_softmax(-1)
    return float(lp.gather(1, torch.tensor(answer)[:, None]).sum())


def test_dropping_against_independent_forwards(small_model: ReferenceNanoVL, small_encoder: Encoder) -> None:
    """Stateless (l = -1) equals transformers' whole-model forward on the kept rows; nothing
    dropped equals the reference's plain logits; dropped after the first attention block
    equals the reference's training forward with that one boundary (float32, tolerance 1e-4;
    measured differences are ~1e-6)."""
    config = ReductionConfig()
    for item in task_items(small_encoder, 4):
        fw = unreduced_forward(small_model, item, config)
        kept = kept_tokens(fw, config, keep=0.25)
        assert len(kept) == 8 and torch.equal(kept, kept.sort().values)
        result = drop_at_each_block(small_model, item, fw, kept)
        assert len(result.loglik) == len(small_model.pattern) + 1

        ids = item.prompt + item.answer
        embeds = small_model.embeds(ids, [item.pixels])
        stay = torch.ones(len(ids), dtype=torch.bool)
        stay[fw.visual[~torch.isin(torch.arange(len(fw.visual)), kept)]] = False
        with torch.no_grad():
            stateless = small_model.lm(inputs_embeds=embeds[stay][None]).logits[0]
            full = small_model.logits(ids, [item.pixels])
        assert result.loglik[0] == pytest.approx(_loglik(stateless, item.answer), abs=1e-4)
        assert result.loglik[-1] == pytest.approx(_loglik(full, item.answer), abs=1e-4)

        first_attention = small_model.pattern.index("*")
        one_boundary = ReductionConfig(boundaries=[first_attention], schedule=[0.25])
        with torch.no_grad():
            h, _ = small_model.forward_kept(embeds[None], [[fw.visual, fw.visual[kept]]], one_boundary)
        feature = h[0, -len(item.answer) - 1]
        assert torch.allclose(result.features[first_attention + 1], feature, atol=1e-4)


def test_questions_from_a_jsonl_file(tmp_path: Path, small_encoder: Encoder) -> None:
    """Videos on disk with questions: same prompt layout as the task's; a missing field is named."""
    rows = []
    for i, seed in enumerate(TEST_SEEDS[:2]):
        e = make_example(seed)
        write_video(e.frames, tmp_path / f"v{i}.avi")
        rows.append({"video": f"v{i}.avi", "question": e.question, "answer": e.answer, "targets": list(e.targets)})
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    items = file_items(small_encoder, tmp_path / "q.jsonl")
    for item, row, task_item in zip(items, rows, task_items(small_encoder, 2), strict=True):
        assert item.prompt == task_item.prompt and item.answer == task_item.answer
        assert item.targets == tuple(row["targets"]) and item.colours == ()
    (tmp_path / "bad.jsonl").write_text(json.dumps({"video": "v0.avi"}))
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field\(s\) \['question'\]"):
        file_items(small_encoder, tmp_path / "bad.jsonl")


def run_analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vllm_stateful_reduce.analyze", "--model", str(SMALL_MODEL), "--threads", "1", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_command_end_to_end(tmp_path: Path) -> None:
    """64 questions on the committed model: a report with every part and a figure, and the
    findings the tool exists to show (measured on 256 questions: attention block 1 recalls
    0.82 of the targets in its top 25%, chance 0.25; the Mamba proxy's best block 0.66
    without the decay, 0.47 with it)."""
    out_json, out_png = tmp_path / "a.json", tmp_path / "a.png"
    run = run_analyze("--items", "64", "--json", str(out_json), "--png", str(out_png))
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert out_png.stat().st_size > 50_000
    report = json.loads(out_json.read_text())
    scoring = {"M0", "A1", "M3", "M5", "A6", "M8", "M10", "A11"}
    assert set(report["sparsity"]) == scoring and set(report["stability"]["blocks"]) == scoring
    for s in report["sparsity"].values():
        assert 0 < s["mass50"]["mean"] <= s["mass90"]["mean"] <= 1 and 0 < s["entropy"]["mean"] <= 1
    recall = report["target_recall"]
    assert recall["blocks"]["A1"]["mean"] >= 2 * recall["chance"], recall

    def best(decay: bool) -> float:
        return max(r["mean"] for n, r in recall["blocks"].items() if n.startswith("M") and n.endswith("decay") == decay)

    assert best(False) > best(True), recall
    drop = report["dropping"]
    assert len(drop["loglik"]) == len(drop["probe"]) == len(report["pattern"]) + 1
    assert drop["minus_stateless"][0] == {"mean": 0.0, "stderr": 0.0}
    assert set(report["summary"]) >= {"mass90_mean", "jaccard_first_last", "probe_stateless", "loglik_full"}


def test_bad_arguments_are_named(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        analyze_main(["--keep", "1.5"])
    assert exit_.value.code == 2 and "--keep: 1.5 is not a fraction" in capsys.readouterr().err


def test_long_family_on_the_long_model(tmp_path: Path) -> None:
    """The long task through the tool (in process, 4 questions): 1,024 visual tokens per
    video, every colour read back, targets known for every kind."""
    out = tmp_path / "long.json"
    code = analyze_main(
        ["--model", str(LONG_MODEL), "--task", "long", "--items", "4", "--threads", "1"] + ["--json", str(out)]
    )
    report = json.loads(out.read_text())
    assert code == 0 and report["visual_tokens"] == [1024] * 4, report["visual_tokens"]
    assert report["target_recall"]["items"] == 4 and report["dropping"]["items"] == 4
