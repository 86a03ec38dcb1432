"""Train the small video-QA model in the plugin's checkpoint layout (plain PyTorch, CPU).

    python scripts/train_video_qa.py --out artifacts/video-qa-model --threads 1   # ~20 min, the committed model

Starts from a random checkpoint built by `vllm_stateful_reduce.checkpoint`, trains
the whole model (RADIO-style ViT, projector, NemotronH) through the plain PyTorch
reference forward on the procedural tasks of `vllm_stateful_reduce.tasks`, with the
exact token layout vLLM's processor produces, and writes a checkpoint vLLM loads with
the plugin. Progress (loss, held-out accuracy per task) is printed as it trains.

What made it learn in minutes instead of not at all: visual embeddings scaled to the
text embeddings' norm at the start (`match_visual_scale`), every batch mixing the
four kinds, and videos drawn from clean (no distractors) to as cluttered as the test
split, so reading colour and shape is learned before selecting among distractors.
"""

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vllm_stateful_reduce.checkpoint import CheckpointSpec, build_checkpoint
from vllm_stateful_reduce.encoding import Encoder
from vllm_stateful_reduce.reference import ReferenceNanoVL
from vllm_stateful_reduce.tasks import KINDS, TEST_SEEDS, TRAIN_SEEDS, Example, make_example


def batch_logits(model: ReferenceNanoVL, enc: Encoder, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced logits for prompt + answer; returns (logits, targets, answer mask)."""
    answers = [enc.answer_ids(e) for e in examples]
    seqs = [enc.prompt_ids(e) + a for e, a in zip(examples, answers)]
    length = max(len(s) for s in seqs)
    # right padding: causal attention and the causal scan never look ahead at it
    ids = torch.tensor([s + [enc.tokenizer.pad_token_id] * (length - len(s)) for s in seqs])
    embeds = model.lm.get_input_embeddings()(ids)
    visual = model.vision_embeddings(torch.cat([enc.pixels(e) for e in examples]))
    embeds = embeds.masked_scatter((ids == model.image_context_id)[..., None], visual.flatten(0, 1).to(embeds.dtype))
    logits = model.lm(inputs_embeds=embeds).logits[:, :-1]
    targets = ids[:, 1:]
    answer = torch.zeros_like(targets, dtype=torch.bool)
    for row, (a, seq) in enumerate(zip(answers, seqs)):
        answer[row, len(seq) - 1 - len(a) : len(seq) - 1] = True
    return logits, targets, answer


@torch.no_grad()
def match_visual_scale(model: ReferenceNanoVL, enc: Encoder) -> None:
    """Scale the projector's output layer so visual embeddings start at the text
    embeddings' norm. At random init they are ~100x larger, and a residual stream that
    large barely takes in what later blocks add (e.g. which frame a token is in)."""
    visual = model.vision_embeddings(torch.cat([enc.pixels(make_example(s)) for s in range(8)]))
    text = model.lm.get_input_embeddings().weight
    model.mlp1["3.weight"].mul_(text.norm(dim=-1).mean() / visual.norm(dim=-1).mean())


@torch.no_grad()
def accuracy(model: ReferenceNanoVL, enc: Encoder, seeds: range, per_kind: int) -> dict[str, float]:
    out = {}
    for kind in KINDS:
        examples = [make_example(s, kind=kind) for s in seeds[: per_kind]]
        logits, targets, answer = batch_logits(model, enc, examples)
        hit = ((logits.argmax(-1) == targets) | ~answer).all(dim=1)
        out[kind] = hit.float().mean().item()
    out["mean"] = sum(out[k] for k in KINDS) / len(KINDS)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("artifacts/video-qa-model"))
    parser.add_argument("--steps", type=int, default=1800, help="optimizer steps (~20 min on one core)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    start_ckpt = build_checkpoint(Path(tempfile.mkdtemp(prefix="vsr-train-")), CheckpointSpec(seed=args.seed))
    model = ReferenceNanoVL(start_ckpt)
    model.train()
    enc = Encoder(start_ckpt)
    match_visual_scale(model, enc)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    step, seed, history = 0, TRAIN_SEEDS.start, []
    held_out = TEST_SEEDS[:10_000]  # the benchmark draws its test split from TEST_SEEDS too
    began = time.monotonic()
    while step < args.steps:
        # linear warm-up, then cosine decay to 10%
        scale = min(1.0, (step + 1) / args.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = args.lr * scale
        # the kinds mixed in every batch; clutter from none to the test split's, so easy
        # videos (no distractors) teach reading colour and shape, cluttered ones selection
        examples = [make_example(seed + i, clutter=clutter) for i, clutter in enumerate(torch.rand(args.batch).mul(0.6).tolist())]
        seed += args.batch
        logits, targets, answer = batch_logits(model, enc, examples)
        loss = F.cross_entropy(logits[answer], targets[answer])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.eval_every == 0:
            model.eval()
            acc = accuracy(model, enc, held_out, per_kind=32)
            model.train()
            history.append({"step": step, "loss": loss.item(), **acc})
            left = (time.monotonic() - began) / step * (args.steps - step) / 60
            print(f"step {step:5d}  loss {loss.item():.3f}  held-out acc " + "  ".join(f"{k} {v:.2f}" for k, v in acc.items()) + f"  ({left:.1f} min left)", flush=True)

    model.eval()
    final = accuracy(model, enc, held_out, per_kind=64)
    args.out.mkdir(parents=True, exist_ok=True)
    for f in start_ckpt.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, args.out / f.name)
    save_file(model.checkpoint_tensors(), args.out / "model.safetensors", metadata={"format": "pt"})
    (args.out / "training.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "minutes": (time.monotonic() - began) / 60, "examples": seed - TRAIN_SEEDS.start,
                    "final_held_out_accuracy": final, "history": history}, indent=2)  # fmt: skip
    )
    print(f"done: {step} steps, held-out accuracy {final}; wrote {args.out}")


if __name__ == "__main__":
    main()
