"""`make demo`: serve the small default model with the plugin, ask about a video, report.

Builds the default checkpoint if it is missing, writes a short generated video,
starts `vllm serve` on loopback, sends one chat request with the video through the
official `openai` client, prints the answer and the request's prefill time (from
the server's Prometheus metrics), and stops the server.
"""

import argparse
import re
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import openai

from vllm_stateful_reduce.checkpoint import build_checkpoint
from vllm_stateful_reduce.launch import running_server
from vllm_stateful_reduce.media import video_data_url, write_video

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "artifacts" / "default-model"


def moving_square_video(num_frames: int = 16, size: int = 96) -> np.ndarray:
    """A red square crossing a grey background: (T, H, W, 3) uint8."""
    frames = np.full((num_frames, size, size, 3), 90, np.uint8)
    for t in range(num_frames):
        x = int(t * (size - 24) / max(num_frames - 1, 1))
        frames[t, 36:60, x : x + 24] = (220, 30, 30)
    return frames


def prefill_seconds(base_url: str) -> tuple[float, int]:
    """(sum, count) of vLLM's per-request prefill-time histogram."""
    text = urllib.request.urlopen(base_url + "/metrics", timeout=5).read().decode()
    total = sum(float(v) for v in re.findall(r"^vllm:request_prefill_time_seconds_sum\{.*\} (\S+)$", text, re.M))
    count = sum(int(float(v)) for v in re.findall(r"^vllm:request_prefill_time_seconds_count\{.*\} (\S+)$", text, re.M))
    return total, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--question", default="Which way does the red square move?")
    args = parser.parse_args()

    if not (args.model / "config.json").exists():
        print(f"building the default checkpoint in {args.model} ...", flush=True)
        build_checkpoint(args.model)
    work = Path(tempfile.mkdtemp(prefix="vsr-demo-"))
    video = write_video(moving_square_video(args.frames), work / "square.mp4", fps=4.0)
    log = work / "serve.log"
    print(f"starting vllm serve with the plugin (log: {log}) ...", flush=True)
    started = time.monotonic()
    with running_server(args.model, log_path=log, extra=["--gpu-memory-utilization", "0.3"]) as url:
        print(f"server up at {url} after {time.monotonic() - started:.0f} s", flush=True)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        model = client.models.list().data[0].id
        before = prefill_seconds(url)
        reply = client.chat.completions.create(
            model=model,
            max_tokens=16,
            temperature=0.0,
            messages=[{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": video_data_url(video)}},
                {"type": "text", "text": args.question},
            ]}],
        )  # fmt: skip
        after = prefill_seconds(url)
    print(f"\nvideo: {args.frames} frames ({video.name}); prompt tokens: {reply.usage.prompt_tokens}")
    print(f"question: {args.question}")
    print(f"answer:   {reply.choices[0].message.content!r}")
    if after[1] > before[1]:
        print(f"prefill time: {1000 * (after[0] - before[0]):.1f} ms (vllm:request_prefill_time_seconds)")
    if (args.model / "build_spec.json").exists():
        print("(random-weight checkpoint: the answer is not meant to be meaningful)")


if __name__ == "__main__":
    main()
