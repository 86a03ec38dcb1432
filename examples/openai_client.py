"""Ask a `vllm serve ... --plugin stateful-reduce` server about local videos (official `openai` client).

    python examples/openai_client.py clip.mp4 --question "What happens?"                # base64 data URL
    python examples/openai_client.py /data/videos/clip.mp4 --question "..." --by-path   # file:// URL
    python examples/openai_client.py clip.mp4 --question "..." --budget 0.5             # this request: keep 50%
    python examples/openai_client.py clip.mp4 --question "..." --no-reduction           # this request: all tokens

A video goes out as an OpenAI `video_url` content part: by default the file's bytes as a
`data:video/mp4;base64,...` URL (works with any server), with `--by-path` as a `file://`
URL, which the server reads itself - only under its `--allowed-local-media-path`.
`--budget` and `--no-reduction` set this request's reduction options,
`extra_body={"mm_processor_kwargs": {"stateful_reduce": {...}}}`; vLLM accepts them only
from a server started with `--trust-request-mm-kwargs` (HTTP 400 otherwise), and an
invalid value is an HTTP 400 naming the field. Prints one JSON line per video.
"""

import argparse
import base64
import json
import mimetypes
import time
from pathlib import Path

import openai


def video_url(path: Path, by_path: bool) -> str:
    """A `file://` URL (the server reads the file) or a base64 data URL (the bytes travel)."""
    if by_path:
        return path.resolve().as_uri()
    mime = mimetypes.guess_type(path.name)[0] or "video/mp4"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def reduction_options(budget: float | None, no_reduction: bool) -> dict:
    """This request's `stateful_reduce` options ({} = the server's settings)."""
    if no_reduction:
        return {"enabled": False}
    return {} if budget is None else {"budget": budget}


def ask(client: openai.OpenAI, model: str, url: str, question: str, options: dict, max_tokens: int) -> tuple[str, int]:
    """The answer and the prompt's token count."""
    reply = client.chat.completions.create(
        model=model,
        max_tokens=max_tokens,
        temperature=0.0,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": url}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        extra_body={"mm_processor_kwargs": {"stateful_reduce": options}} if options else None,
    )
    return (reply.choices[0].message.content or "").strip(), reply.usage.prompt_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("videos", type=Path, nargs="+", help="local video files")
    parser.add_argument("--question", required=True)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", help="served model name (default: the server's first)")
    parser.add_argument("--by-path", action="store_true", help="send file:// URLs instead of the bytes")
    options = parser.add_mutually_exclusive_group()
    options.add_argument("--budget", type=float, help="this request's kept fraction of visual tokens")
    options.add_argument("--no-reduction", action="store_true", help="this request with all visual tokens")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    missing = [str(v) for v in args.videos if not v.is_file()]
    if missing:
        parser.error(f"videos: not a file: {', '.join(missing)}")

    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0)
    model = args.model or client.models.list().data[0].id
    request_options = reduction_options(args.budget, args.no_reduction)
    for video in args.videos:
        started = time.monotonic()
        try:
            answer, prompt_tokens = ask(
                client, model, video_url(video, args.by_path), args.question, request_options, args.max_tokens
            )
        except openai.BadRequestError as err:  # e.g. an invalid option, a file outside the allowed path
            parser.exit(1, f"error: {video}: {err.message}\n")
        print(
            json.dumps(
                {
                    "video": str(video),
                    "question": args.question,
                    "answer": answer,
                    "sent_as": "file" if args.by_path else "base64",
                    "options": request_options,
                    "prompt_tokens": prompt_tokens,
                    "seconds": round(time.monotonic() - started, 3),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
