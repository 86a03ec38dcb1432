"""Offline batch job: ask about every video in a folder with `LLM.generate`, write JSONL.

    python examples/offline_batch.py VIDEOS_DIR --question "What happens?" --out answers.jsonl
    python examples/offline_batch.py VIDEOS_DIR --questions questions.jsonl --budget 0.35 --out answers.jsonl

`--questions` is a JSONL file of {"video": "<file under VIDEOS_DIR>", "question": "..."};
with `--question` every `*.mp4` under the folder gets the same question. Each output
line: video, question, answer, the visual tokens kept per stage (stage 0 = all that
enter the language model; null when the request is not reduced) and timings from the
engine (seconds: arrival to first token, prefill step, decode). A video that cannot be
decoded gets a line with "error" and the job goes on.

The engine gets what `vllm serve ... --plugin stateful-reduce` sets: the plugin's
architecture, eager mode, no prefix caching, no chunked prefill, a step budget that
holds a whole prompt, and Model Runner V1. Videos are decoded here with OpenCV and
sampled uniformly to `--num-frames`, as vLLM's loader does for served videos.
"""

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from vllm_stateful_reduce import HF_OVERRIDES, REQUIRED_ENGINE_ARGS
from vllm_stateful_reduce.config import ReductionConfig, parse
from vllm_stateful_reduce.model.hf_config import NemotronNanoVLConfig
from vllm_stateful_reduce.schedule import build_schedule

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "video-qa-small"
VIDEO_PLACEHOLDER = "<video>"  # where the processor puts the frames in the prompt


@dataclass(frozen=True)
class Job:
    video: str  # as given: relative to the videos folder
    question: str


def read_jobs(folder: Path, question: str | None, questions_file: Path | None) -> list[Job]:
    """The (video, question) pairs; ValueError naming the bad option, line or field."""
    if not folder.is_dir():
        raise ValueError(f"videos: {folder} is not a folder")
    if question is not None:
        videos = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.mp4"))
        if not videos:
            raise ValueError(f"videos: no .mp4 files under {folder}")
        return [Job(v, question) for v in videos]
    assert questions_file is not None
    jobs = []
    for number, line in enumerate(questions_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"--questions {questions_file}, line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not JSON ({err.msg})") from None
        for field in ("video", "question"):
            if not isinstance(entry, dict) or not isinstance(entry.get(field), str) or not entry[field].strip():
                raise ValueError(f"{where}: needs a non-empty string {field!r}")
        if not (folder / entry["video"]).is_file():
            raise ValueError(f"{where}: video {entry['video']!r} is not a file under {folder}")
        jobs.append(Job(entry["video"], entry["question"]))
    if not jobs:
        raise ValueError(f"--questions {questions_file}: no questions")
    return jobs


def load_video(path: Path, num_frames: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Up to `num_frames` frames sampled uniformly (all if fewer), RGB, with the metadata
    vLLM's video loader attaches (fps and frame indices become the frames' text)."""
    capture = cv2.VideoCapture(str(path))
    total, fps = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), capture.get(cv2.CAP_PROP_FPS)
    if not capture.isOpened() or total <= 0 or fps <= 0:
        raise ValueError(f"{path.name}: not a readable video")
    wanted = set(range(total) if total <= num_frames else np.linspace(0, total - 1, num_frames, dtype=int).tolist())
    frames, indices = [], []
    for index in range(max(wanted) + 1):
        if not capture.grab():
            break
        if index in wanted and (decoded := capture.retrieve())[0]:
            frames.append(decoded[1][..., ::-1])  # OpenCV decodes BGR
            indices.append(index)
    capture.release()
    if not frames:
        raise ValueError(f"{path.name}: no frame could be decoded")
    metadata = {
        "fps": fps,
        "duration": total / fps,
        "total_num_frames": total,
        "frames_indices": indices,
        "video_backend": "opencv",
        "do_sample_frames": False,
    }
    return np.ascontiguousarray(np.stack(frames)), metadata


def video_request(job: Job, args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """The `LLM.generate` prompt of one job (ValueError if its video cannot be read)."""
    video = load_video(args.videos / job.video, args.num_frames)
    messages = [{"role": "user", "content": f"{VIDEO_PLACEHOLDER}\n{job.question}"}]  # the checkpoint's chat template
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return {"prompt": prompt, "multi_modal_data": {"video": video}}


def reduction_settings(args: argparse.Namespace) -> ReductionConfig:
    """The job's global reduction config, checked against the checkpoint's blocks before
    an engine starts (ValueError naming the field, e.g. a budget they cannot reach)."""
    reduction = parse({"enabled": False} if args.no_reduction else {"budget": args.budget})
    if reduction.enabled:
        build_schedule(NemotronNanoVLConfig.from_pretrained(args.model).text_config.hybrid_override_pattern, reduction)
    return reduction


def engine_kwargs(args: argparse.Namespace, reduction: ReductionConfig) -> dict[str, Any]:
    """`LLM(...)` arguments: the plugin's engine settings plus the job's options."""
    return {
        "model": str(args.model),
        "hf_overrides": HF_OVERRIDES,  # the plugin's architecture and config class
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "max_num_batched_tokens": args.max_model_len,  # a prompt is prefilled in one step
        "limit_mm_per_prompt": {"video": 1},
        "additional_config": {"stateful_reduce": reduction.model_dump(exclude_defaults=True)},
        "disable_log_stats": False,  # per-request timestamps in RequestOutput.metrics
        "seed": 0,
        **REQUIRED_ENGINE_ARGS,
    }


def kept_per_stage(
    prompt_token_ids: Sequence[int], hf_config: Any, tokenizer: Any, reduction: ReductionConfig
) -> list[int] | None:
    """Visual tokens each stage keeps: fixed by the schedule and the prompt (which ones
    the engine picks is its own choice); None when nothing is dropped."""
    if not reduction.enabled:
        return None
    visual = list(prompt_token_ids).count(tokenizer.convert_tokens_to_ids("<image>"))
    if not visual:
        return None
    counts = build_schedule(hf_config.text_config.hybrid_override_pattern, reduction).keep_counts(
        visual, reduction.min_keep
    )
    return counts if counts[-1] < visual else None


def timings(metrics: Any) -> dict[str, float] | None:
    """Seconds from the engine's per-request stats (monotonic engine-core clock)."""
    if metrics is None:
        return None
    return {
        "first_token_s": round(metrics.first_token_latency, 4),
        "prefill_s": round(metrics.first_token_ts - metrics.scheduled_ts, 4),
        "decode_s": round(metrics.last_token_ts - metrics.first_token_ts, 4),
    }


def chunks(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    for start in range(0, len(jobs), size):
        yield jobs[start : start + size]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("videos", type=Path, help="folder of .mp4 videos")
    asked = parser.add_mutually_exclusive_group(required=True)
    asked.add_argument("--question", help="one question for every video")
    asked.add_argument("--questions", type=Path, help='JSONL of {"video": ..., "question": ...}')
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint (Nemotron Nano VL v2 layout)")
    parser.add_argument(
        "--budget",
        type=float,
        default=ReductionConfig().budget,
        help="kept fraction of visual tokens, depth-averaged (global)",
    )
    parser.add_argument("--no-reduction", action="store_true", help="serve every video with all its visual tokens")
    parser.add_argument("--max-tokens", type=int, default=64, help="answer length limit (greedy decoding)")
    parser.add_argument("--out", type=Path, required=True, help="output JSONL, one line per video")
    parser.add_argument(
        "--num-frames", type=int, default=32, help="frames sampled per video (vLLM's default for served videos)"
    )
    parser.add_argument("--max-model-len", type=int, default=32768)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=16, help="videos decoded and generated together")
    args = parser.parse_args(argv)
    try:
        args.jobs = read_jobs(args.videos, args.question, args.questions)
        args.reduction = reduction_settings(args)
    except (ValueError, OSError) as err:  # ConfigError is a ValueError; OSError: an unreadable file
        parser.error(str(err))
    for name in ("max_tokens", "num_frames", "max_model_len", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args, args.reduction))
    tokenizer, hf_config = llm.get_tokenizer(), llm.llm_engine.model_config.hf_config
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    started, answered = time.monotonic(), 0
    with args.out.open("w") as out, tqdm(total=len(args.jobs), unit="video", file=sys.stderr) as progress:
        for batch in chunks(args.jobs, args.batch_size):
            lines: list[dict[str, Any]] = []  # one per job of the batch, in order
            requests, slots = [], []
            for job in batch:
                try:
                    requests.append(video_request(job, args, tokenizer))
                    slots.append(len(lines))
                    lines.append({})
                except ValueError as err:  # an unreadable video: say so and go on
                    lines.append({"video": job.video, "question": job.question, "error": str(err)})
            for slot, result in zip(
                slots, llm.generate(requests, sampling, use_tqdm=False) if requests else [], strict=True
            ):
                lines[slot] = {
                    "video": batch[slot].video,
                    "question": batch[slot].question,
                    "answer": result.outputs[0].text.strip(),
                    "kept_visual_tokens": kept_per_stage(result.prompt_token_ids, hf_config, tokenizer, args.reduction),
                    "timing": timings(result.metrics),
                }
            out.writelines(json.dumps(line) + "\n" for line in lines)
            out.flush()
            answered += len(slots)
            progress.update(len(batch))
    print(
        f"{answered}/{len(args.jobs)} videos answered in {time.monotonic() - started:.1f} s -> {args.out}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
