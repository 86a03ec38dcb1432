"""Train the small video-QA model in the plugin's checkpoint layout (plain PyTorch, CPU).

    python scripts/train_video_qa.py --out artifacts/base --threads 1            # ~20 min from random weights
    # ~11 min finetuning under reduction:
    python scripts/train_video_qa.py --init artifacts/base --out artifacts/video-qa-model --budgets 1,0.25 \
        --codec-share 0.5 --steps 600 --warmup 30 --lr 5e-4 --eval-every 50 --threads 1

(the two steps that made the committed `models/video-qa-small`), and for the long task family
(64 frames of 128 px), from that model, ~39 min:

    python scripts/train_video_qa.py --task long --init models/video-qa-small --out artifacts/long-base \
        --frames 8,16,24 --steps 600 --lr 1e-3 --warmup 50 --eval-every 100 --eval-examples 16 --threads 1
    python scripts/train_video_qa.py --task long --init artifacts/long-base --out artifacts/video-qa-long \
        --budgets 1,0.25 --codec-share 0.5 --frames 32,64 --steps 120 --batch 8 --lr 5e-4 --warmup 20 \
        --eval-every 30 --eval-examples 12 --threads 1

(`models/video-qa-long`). An `--init` checkpoint for smaller frames gets its ViT position grid
resized first (`checkpoint.resize_frames`); `--frames` trains on shorter videos first, as they
are much cheaper (a step on 64 frames costs ~5x one on 16).

Starts from a random checkpoint built by `vllm_stateful_reduce.testing.checkpoint` (or `--init`), trains
the whole model (RADIO-style ViT, projector, NemotronH) through the plain PyTorch
reference forward on the procedural tasks of `vllm_stateful_reduce.testing.tasks`, with the
exact token layout vLLM's processor produces, and writes a checkpoint vLLM loads with
the plugin. Progress (loss, held-out accuracy per task) is printed as it trains.
With `--budgets`, batches are trained under reduction: the reference's reduced forward
picks each example's kept tokens (no gradient through the choice), and the model learns
to answer from them (`ReferenceNanoVL.forward_kept`).

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
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vllm_stateful_reduce.config import ReductionConfig
from vllm_stateful_reduce.testing.checkpoint import CheckpointSpec, build_checkpoint, resize_frames
from vllm_stateful_reduce.testing.encoding import Encoder
from vllm_stateful_reduce.testing.oracle import ReferenceNanoVL
from vllm_stateful_reduce.testing.tasks import FAMILIES, TEST_SEEDS, TRAIN_SEEDS, Example, make_example
from vllm_stateful_reduce.testing.tokenizer import ORDERS
from vllm_stateful_reduce.testing.video_files import codec_roundtrip


def batch_logits(
    model: ReferenceNanoVL,
    enc: Encoder,
    examples: list[Example],
    reduction: ReductionConfig | None = None,
    orders: list[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced logits for prompt + answer; returns (logits, targets, answer mask).
    `orders`: each example's prompt order (default video first). With `reduction`, each
    example's visual tokens are dropped as the reference's reduced forward selects them
    for its prompt (finetuning under reduction)."""
    answers = [enc.answer_ids(e) for e in examples]
    prompts = [enc.prompt_ids(e, o) for e, o in zip(examples, orders or ["video_first"] * len(examples), strict=True)]
    seqs = [p + a for p, a in zip(prompts, answers, strict=True)]
    length = max(len(s) for s in seqs)
    # right padding: causal attention and the causal scan never look ahead at it
    ids = torch.tensor([s + [enc.tokenizer.pad_token_id] * (length - len(s)) for s in seqs])
    pixels = [enc.pixels(e) for e in examples]
    embeds = model.lm.get_input_embeddings()(ids)
    visual = model.vision_embeddings(torch.cat(pixels))
    embeds = embeds.masked_scatter((ids == model.image_context_id)[..., None], visual.flatten(0, 1).to(embeds.dtype))
    answer = torch.zeros_like(ids, dtype=torch.bool)
    for row, (a, seq) in enumerate(zip(answers, seqs, strict=True)):
        answer[row, len(seq) - len(a) : len(seq)] = True
    if reduction is None:
        rows = torch.arange(length).expand(len(ids), -1)
        logits = model.lm(inputs_embeds=embeds).logits
    else:
        kept = [model.reduced_forward(p, [px], reduction)[1] for p, px in zip(prompts, pixels, strict=True)]
        h, rows = model.forward_kept(embeds, kept, reduction)
        logits = model.lm.lm_head(h)
    # row j predicts the token after its original position; dropped rows are all visual,
    # so from the question on, consecutive rows are consecutive positions
    return logits[:, :-1], ids.gather(1, rows[:, 1:]), answer.gather(1, rows[:, 1:])


@torch.no_grad()
def match_visual_scale(model: ReferenceNanoVL, enc: Encoder, family: str) -> None:
    """Scale the projector's output layer so visual embeddings start at the text
    embeddings' norm. At random init they are ~100x larger, and a residual stream that
    large barely takes in what later blocks add (e.g. which frame a token is in)."""
    visual = model.vision_embeddings(torch.cat([enc.pixels(make_example(s, family=family)) for s in range(8)]))
    text = model.lm.get_input_embeddings().weight
    model.mlp1["3.weight"].mul_(text.norm(dim=-1).mean() / visual.norm(dim=-1).mean())


@torch.no_grad()
def answered(
    model: ReferenceNanoVL,
    enc: Encoder,
    examples: list[Example],
    reduction: ReductionConfig | None = None,
    order: str = "video_first",
) -> torch.Tensor:
    """Per example: is every answer token the argmax (exact match, teacher forced)."""
    logits, targets, answer = batch_logits(model, enc, examples, reduction, [order] * len(examples))
    return ((logits.argmax(-1) == targets) | ~answer).all(dim=1)


def accuracy(
    model: ReferenceNanoVL,
    enc: Encoder,
    seeds: range,
    per_kind: int,
    reduction: ReductionConfig | None = None,
    family: str = "short",
    order: str = "video_first",
    num_frames: int | None = None,
) -> dict[str, float]:
    kinds = FAMILIES[family].kinds
    out = {}
    for kind in kinds:
        examples = [make_example(s, num_frames, kind=kind, family=family) for s in seeds[:per_kind]]
        out[kind] = answered(model, enc, examples, reduction, order).float().mean().item()
    out["mean"] = sum(out[k] for k in kinds) / len(kinds)
    return out


def frames_at(step: int, steps: int, curriculum: list[int]) -> int:
    """Frames per video at `step`: from curriculum[0] to curriculum[-1] in equal stages
    (short videos are cheap, so most steps see more examples early on)."""
    return curriculum[min(step * len(curriculum) // steps, len(curriculum) - 1)]


def starting_checkpoint(args: argparse.Namespace) -> Path:
    """`--init` (its ViT position grid resized when the task's frames are larger), or a
    random checkpoint for the task's frame size."""
    size = FAMILIES[args.task].size
    if not args.init:
        spec = CheckpointSpec(seed=args.seed, image_size=size)
        return build_checkpoint(Path(tempfile.mkdtemp(prefix="vsr-train-")), spec)
    if json.loads((args.init / "config.json").read_text())["force_image_size"] == size:
        return args.init
    return resize_frames(args.init, size, Path(tempfile.mkdtemp(prefix="vsr-resized-")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("artifacts/video-qa-model"))
    parser.add_argument("--task", choices=sorted(FAMILIES), default="short", help="task family (tasks.FAMILIES)")
    parser.add_argument(
        "--frames",
        type=lambda v: [int(f) for f in v.split(",")],
        help="frames per training video, as stages of equal length, e.g. 16,32,64 (default: the task's)",
    )
    parser.add_argument(
        "--clutter",
        type=lambda v: [float(c) for c in v.split(",")],
        default=[0.0, 0.6],
        help="distractor share of training videos, drawn uniformly from LO,HI (the test split has 0.6)",
    )
    parser.add_argument("--eval-frames", type=int, help="frames of the held-out videos (default: the task's)")
    parser.add_argument("--steps", type=int, default=1800, help="optimizer steps (~20 min on one core)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument(
        "--eval-examples", type=int, default=32, help="held-out examples per kind at each eval (twice that at the end)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--codec-share",
        type=float,
        default=0.0,
        help="share of training videos sent through an MP4 encode/decode first, as served videos are",
    )
    parser.add_argument(
        "--order",
        choices=[*ORDERS, "mixed"],
        default="video_first",
        help="where the question stands relative to the video; mixed draws one per example (and evaluates both)",
    )
    parser.add_argument(
        "--kinds",
        type=lambda v: v.split(","),
        help="task kinds cycled through the examples, repeats weigh a kind up (default: the task's), "
        "e.g. after,after,colour_of",
    )
    parser.add_argument("--init", type=Path, help="start from this checkpoint instead of a random one (finetuning)")
    parser.add_argument(
        "--budgets",
        type=lambda v: [float(b) for b in v.split(",")],
        default=[1.0],
        help="each batch is trained under the reduction (--reduction) at one of these budgets, drawn "
        "uniformly (1 = all tokens); e.g. 1,0.25 finetunes under reduction",
    )
    parser.add_argument(
        "--reduction",
        type=json.loads,
        default={},
        help="reduction options besides the budget (default: the plugin's, with min_keep 1), e.g. FastV-style "
        '\'{"boundaries": [1], "schedule": "step", "score_layers": "attention"}\'',
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    start_ckpt = starting_checkpoint(args)
    model = ReferenceNanoVL(start_ckpt)
    model.train()
    enc = Encoder(start_ckpt)
    if not args.init:
        match_visual_scale(model, enc, args.task)
    curriculum = args.frames or [FAMILIES[args.task].num_frames]
    reduction = lambda budget: ReductionConfig(**{"min_keep": 1} | args.reduction | {"budget": budget})  # noqa: E731
    reductions = [None if b == 1.0 else reduction(b) for b in args.budgets]
    # held-out accuracy per (name, reduction, order); video-first keeps the unprefixed names
    eval_orders = ORDERS if args.order == "mixed" else (args.order,)
    watch = {
        (name if order == "video_first" else f"{order} {name}"): (r, order)
        for order in eval_orders
        for name, r in {"full": None, **({"25%": reduction(0.25)} if any(reductions) else {})}.items()
    }
    full = "full" if "full" in watch else f"{eval_orders[0]} full"
    kinds = args.kinds or FAMILIES[args.task].kinds
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
        frames = frames_at(step, args.steps, curriculum)
        examples = [
            make_example(
                seed + i, num_frames=frames, kind=kinds[(seed + i) % len(kinds)], clutter=clutter, family=args.task
            )
            for i, clutter in enumerate(torch.empty(args.batch).uniform_(*args.clutter).tolist())
        ]
        orders = [ORDERS[int(b)] for b in torch.randint(2, (args.batch,))] if args.order == "mixed" else None
        examples = [
            replace(e, frames=codec_roundtrip(e.frames)) if r < args.codec_share else e
            for e, r in zip(examples, torch.rand(args.batch).tolist(), strict=True)
        ]
        seed += args.batch
        logits, targets, answer = batch_logits(
            model,
            enc,
            examples,
            reductions[int(torch.randint(len(reductions), ()))],
            orders or [args.order] * args.batch,
        )
        loss = F.cross_entropy(logits[answer], targets[answer])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.eval_every == 0:
            model.eval()
            acc = {
                name: accuracy(model, enc, held_out, args.eval_examples, r, args.task, o, args.eval_frames)
                for name, (r, o) in watch.items()
            }
            model.train()
            history.append(
                {"step": step, "frames": frames, "loss": loss.item(), **acc[full]}
                | {f"{name} {k}": v for name, a in acc.items() if name != full for k, v in a.items()}
            )
            left = (time.monotonic() - began) / step * (args.steps - step) / 60
            shown = "  ".join(f"{name}: " + " ".join(f"{k} {v:.2f}" for k, v in a.items()) for name, a in acc.items())
            print(
                f"step {step:5d}  frames {frames}  loss {loss.item():.3f}  held-out acc {shown}  ({left:.1f} min left)",
                flush=True,
            )

    model.eval()
    final = {
        name: accuracy(model, enc, held_out, 2 * args.eval_examples, r, args.task, o, args.eval_frames)
        for name, (r, o) in watch.items()
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for f in start_ckpt.iterdir():
        if f.name not in ("model.safetensors", "training.json", "README.md"):
            shutil.copy(f, args.out / f.name)
    save_file(model.checkpoint_tensors(), args.out / "model.safetensors", metadata={"format": "pt"})
    (args.out / "training.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "minutes": (time.monotonic() - began) / 60,
                "examples": seed - TRAIN_SEEDS.start,
                "final_held_out_accuracy": final,
                "history": history,
                "init_training": json.loads((args.init / "training.json").read_text()) if args.init else None,
            },
            indent=2,
        )
    )
    print(f"done: {step} steps, held-out accuracy {final}; wrote {args.out}")


if __name__ == "__main__":
    main()
