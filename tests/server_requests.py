"""Chat requests and `/metrics` readings shared by the server load and fault tests."""

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from vllm_stateful_reduce.model.tokens import IMG_CONTEXT
from vllm_stateful_reduce.testing.launch import running_server

from .helpers import video_part

# a client must drop an idle connection before the server does (test servers: after 30 s,
# `launch.SERVER_KEEPALIVE_SECONDS`), or a request sent on it as it closes is lost
KEEPALIVE_SECONDS = 1.0


def server_client(url: str, timeout: float = 600) -> openai.OpenAI:
    """The official client for a test server: no retries (a retry could hide or repeat a
    request), and idle connections dropped before the server drops them."""
    limits = openai.DEFAULT_CONNECTION_LIMITS
    http_client = openai.DefaultHttpxClient(
        limits=type(limits)(
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=KEEPALIVE_SECONDS,
        )
    )
    return openai.OpenAI(
        base_url=url + "/v1", api_key="unused", max_retries=0, timeout=timeout, http_client=http_client
    )


@contextmanager
def server_with_metrics(
    checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, max_model_len: int = 4096, extra: Sequence[str] = ()
) -> Iterator[str]:
    """A float32 server accepting per-request options, in Prometheus multiprocess mode so
    that the plugin's counters (made in the worker) and vLLM's figures share `/metrics`."""
    flags = [
        "--dtype",
        "float32",
        "--gpu-memory-utilization",
        "0.3",
        "--trust-request-mm-kwargs",
        "--seed",
        "0",
        *extra,
    ]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path_factory.mktemp("prometheus")))
        start = time.monotonic()
        with running_server(
            checkpoint, log_path=tmp_path_factory.mktemp("logs") / "serve.log", max_model_len=max_model_len, extra=flags
        ) as url:
            print(f"server healthy after {time.monotonic() - start:.1f} s")
            yield url


@dataclass(frozen=True)
class Chat:
    """One chat request: a video (data URL) or none, per-request reduction options
    (None: not sent), streamed or not. Greedy, a fixed length (EOS ignored)."""

    video: str | None
    options: dict | None
    stream: bool
    max_tokens: int
    question: str = "What happens in this video?"


@dataclass(frozen=True)
class Answer:
    """What came back: the text, the sampled token ids and their log-probabilities."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str | None


def request_body(chat: Chat) -> dict:
    """Arguments of `client.chat.completions.create` for `chat`."""
    content = [{"type": "text", "text": chat.question}]
    if chat.video is not None:
        content.insert(0, video_part(chat.video))
    extra = {"ignore_eos": True, "return_tokens_as_token_ids": True}
    if chat.options is not None:
        extra["mm_processor_kwargs"] = {"stateful_reduce": chat.options}
    return dict(
        messages=[{"role": "user", "content": content}],
        max_tokens=chat.max_tokens,
        temperature=0.0,
        logprobs=True,
        top_logprobs=0,
        stream=chat.stream,
        extra_body=extra,
    )


def token_id(token: str) -> int:
    """`token_id:N` (vLLM's `return_tokens_as_token_ids`) -> N."""
    prefix, _, value = token.partition(":")
    assert prefix == "token_id", token
    return int(value)


def send(client: openai.OpenAI, model: str, chat: Chat) -> Answer:
    """Send `chat` and collect the answer (from the chunks when streamed)."""
    out = client.chat.completions.create(model=model, **request_body(chat))
    if not chat.stream:
        choice = out.choices[0]
        items = choice.logprobs.content
        return Answer(
            choice.message.content,
            tuple(token_id(t.token) for t in items),
            tuple(t.logprob for t in items),
            choice.finish_reason,
        )
    text, items, finish = [], [], None
    for chunk in out:
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            items.extend(choice.logprobs.content if choice.logprobs else [])
            finish = choice.finish_reason or finish
    return Answer("".join(text), tuple(token_id(t.token) for t in items), tuple(t.logprob for t in items), finish)


def send_together(client: openai.OpenAI, model: str, chats: Sequence[Chat]) -> list[Answer]:
    """All of `chats` at once (a thread each)."""
    with ThreadPoolExecutor(len(chats)) as pool:
        return list(pool.map(lambda chat: send(client, model, chat), chats))


def max_logprob_difference(a: Sequence[Answer], b: Sequence[Answer]) -> float:
    """Largest |log-prob difference| over all tokens of answers with the same tokens."""
    return max(abs(x - y) for p, q in zip(a, b, strict=True) for x, y in zip(p.logprobs, q.logprobs, strict=True))


def plugin_counts(server: str) -> dict[str, float]:
    """The plugin's request and visual-token counters (summed over labels)."""
    names = ("requests_reduced", "requests_unreduced", "visual_tokens")
    return {name: metric(server, f"vllm:stateful_reduce_{name}_total") for name in names}


def metric(server: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` on the server's `/metrics` whose labels include `labels`."""
    text = requests.get(server + "/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.2) -> float:
    """Seconds until `condition()` held; raise TimeoutError after `timeout` seconds."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - start


def visual_tokens(server: str, model: str, video: str) -> int:
    """Visual tokens of a prompt with `video`, counted in the server's own `/tokenize`."""
    messages = request_body(Chat(video, None, False, 1))["messages"]
    tokens = requests.post(
        server + "/tokenize", json={"model": model, "messages": messages, "add_generation_prompt": True}, timeout=60
    )
    tokens.raise_for_status()
    context = requests.post(
        server + "/tokenize", json={"model": model, "prompt": IMG_CONTEXT, "add_special_tokens": False}, timeout=10
    )
    (context_id,) = context.json()["tokens"]
    return tokens.json()["tokens"].count(context_id)
