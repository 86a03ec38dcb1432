"""Ask a running server video questions through the OpenAI API (docker/build_cpu.sh).

Runs where the plugin is installed (build_cpu.sh pipes it into the container with
`podman exec -i NAME python3 - --url ...`): makes held-out videos of the task family the
small model was trained on, sends each as an MP4 data URL with its question, prints the
expected and the served answer, and exits non-zero if a request fails or an answer is
empty. A wrong answer is reported, not an error: the model is right about 77% of the time.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import openai

from vllm_stateful_reduce.testing.tasks import KINDS, TEST_SEEDS, make_example
from vllm_stateful_reduce.testing.video_files import video_question, write_video


def ask(client: openai.OpenAI, model: str, video: Path, question: str) -> str:
    """One chat completion with a `video_url` content part; the reply's text."""
    reply = client.chat.completions.create(
        model=model,
        max_tokens=8,
        temperature=0.0,
        messages=video_question(video, question),
    )
    return (reply.choices[0].message.content or "").strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--per-kind", type=int, default=1, help="videos per question kind")
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.url + "/v1", api_key="unused", timeout=120)
    model = client.models.list().data[0].id
    examples = [make_example(TEST_SEEDS[i], kind=kind) for kind in KINDS for i in range(args.per_kind)]
    right = 0
    with tempfile.TemporaryDirectory() as work:
        for example in examples:
            video = write_video(example.frames, Path(work) / f"{example.kind}-{example.seed}.mp4")
            answer = ask(client, model, video, example.question)
            if not answer:
                print(f"empty answer to {example.question!r}", file=sys.stderr)
                return 1
            right += answer == example.answer
            print(f"{example.question:<36} expected {example.answer:<9} answered {answer}", flush=True)
    print(f"{right}/{len(examples)} right ({model}, reduction at the server's default budget)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
