"""`make demo`: serve the small trained model with the plugin and ask it about videos.

Writes a few held-out videos of the procedural QA task (`--per-kind` per question
kind) as MP4 files, starts `vllm serve` with the plugin on loopback, sends each video
with its question through the official `openai` client twice - with all visual tokens
(per request `enabled: false`) and with the server's default reduction (25% budget) -
prints question, expected answer and both answers, the accuracy of each, and the
mean prefill time (from the server's Prometheus metrics), and stops the server.
"""

import argparse
import re
import tempfile
import time
import urllib.request
from pathlib import Path

import openai

from vllm_stateful_reduce.testing.launch import running_server
from vllm_stateful_reduce.testing.tasks import KINDS, TEST_SEEDS, make_example
from vllm_stateful_reduce.testing.video_files import video_question, write_video

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "video-qa-small"


def prefill_seconds(base_url: str) -> tuple[float, int]:
    """(sum, count) of vLLM's per-request prefill-time histogram."""
    text = urllib.request.urlopen(base_url + "/metrics", timeout=5).read().decode()
    total = sum(float(v) for v in re.findall(r"^vllm:request_prefill_time_seconds_sum\{.*\} (\S+)$", text, re.M))
    count = sum(int(float(v)) for v in re.findall(r"^vllm:request_prefill_time_seconds_count\{.*\} (\S+)$", text, re.M))
    return total, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--per-kind", type=int, default=2, help="videos per question kind")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vsr-demo-"))
    examples = [make_example(TEST_SEEDS[i], kind=kind) for kind in KINDS for i in range(args.per_kind)]
    videos = [write_video(e.frames, work / f"{e.kind}-{e.seed}.mp4", fps=2.0) for e in examples]
    log = work / "serve.log"
    print(f"starting vllm serve with the plugin (log: {log}) ...", flush=True)
    started = time.monotonic()
    extra = ["--gpu-memory-utilization", "0.3", "--trust-request-mm-kwargs"]  # per-request reduction options
    with running_server(args.model, log_path=log, extra=extra) as url:
        print(f"server up at {url} after {time.monotonic() - started:.0f} s\n", flush=True)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        model = client.models.list().data[0].id
        before, right = prefill_seconds(url), {"full": 0, "reduced": 0}
        print(f"{'video':<22} {'question':<34} {'expected':<9} {'full':<9} reduced 25%")
        for e, video in zip(examples, videos, strict=True):
            answers = {}
            for mode, options in (("full", {"enabled": False}), ("reduced", {})):
                reply = client.chat.completions.create(
                    model=model,
                    max_tokens=8,
                    temperature=0.0,
                    messages=video_question(video, e.question),
                    extra_body={"mm_processor_kwargs": {"stateful_reduce": options}},
                )
                answers[mode] = reply.choices[0].message.content.strip()
                right[mode] += answers[mode] == e.answer
            print(
                f"{video.name:<22} {e.question:<34} {e.answer:<9} {answers['full']:<9} {answers['reduced']}", flush=True
            )
        after = prefill_seconds(url)
    n = len(examples)
    print(
        f"\nright: full {right['full']}/{n}, reduced {right['reduced']}/{n}; {reply.usage.prompt_tokens} prompt "
        "tokens per request"
    )
    if after[1] > before[1]:
        mean = 1000 * (after[0] - before[0]) / (after[1] - before[1])
        print(
            f"mean prefill time: {mean:.1f} ms over {after[1] - before[1]} requests (vllm:request_prefill_time_seconds)"
        )


if __name__ == "__main__":
    main()
