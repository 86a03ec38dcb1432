"""Preemption on a real server: a KV cache too small for the batch, concurrent requests.

With 12 KV blocks (1,536 token slots) four ~450-token prompts decoding 160 tokens each
cannot all stay: vLLM preempts running requests and later recomputes prompt + output
as one prefill. The plugin must reduce that prefill again, pick the same tokens (the
query ends at the original prompt) and decode on to the answers each request gives
alone, when nothing is preempted.
"""

import time
from collections.abc import Iterator

import openai
import pytest

from vllm_stateful_reduce.testing.video_files import video_data_url, write_video

from .helpers import random_video
from .server_requests import (
    Chat,
    max_logprob_difference,
    metric,
    plugin_counts,
    send,
    send_together,
    server_client,
    server_with_metrics,
)

pytestmark = pytest.mark.engine  # starts a vLLM engine or server

MAX_TOKENS = 160
# the smallest pool vLLM accepts at 1024 tokens: the null block, 5 Mamba groups, 3 stage
# groups x 8 blocks of 128
NUM_BLOCKS = 30
LOGPROB_TOLERANCE = 1e-5  # as in test_server_load: batch composition may move the last bits
PREEMPTIONS = "vllm:num_preemptions_total"


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory) -> Iterator[str]:
    extra = [
        "--num-gpu-blocks-override",
        str(NUM_BLOCKS),
        "--additional-config",
        '{"stateful_reduce": {"min_keep": 4}}',
    ]
    with server_with_metrics(checkpoint, tmp_path_factory, max_model_len=1024, extra=extra) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server_client(server, timeout=300)


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> list[Chat]:
    """Four reduced requests (the default budget and overridden ones), so that whichever
    request vLLM preempts is a reduced one."""
    root = tmp_path_factory.mktemp("media")
    videos = [video_data_url(write_video(random_video(16, seed=30 + i), root / f"v{i}.mp4")) for i in range(4)]
    options = [None, {"budget": 0.5}, None, {"budget": 0.35}]
    return [
        Chat(video, opts, stream=i % 2 == 1, max_tokens=MAX_TOKENS, question="What moves?")
        for i, (video, opts) in enumerate(zip(videos, options, strict=True))
    ]


def test_preempted_requests_answer_as_alone(client, server, chats) -> None:
    model = client.models.list().data[0].id
    counted, preempted = plugin_counts(server), metric(server, PREEMPTIONS)
    start = time.monotonic()
    together = send_together(client, model, chats)
    together_s = time.monotonic() - start
    preemptions = metric(server, PREEMPTIONS) - preempted
    prefills = {name: value - counted[name] for name, value in plugin_counts(server).items()}
    print(
        f"{len(chats)} requests together: {together_s:.1f} s, {preemptions:.0f} preemptions, plugin counts {prefills}"
    )
    assert preemptions > 0, "the KV cache was meant to be too small for the batch"
    # every recompute was reduced again: one reduced prefill per request and per preemption
    assert prefills["requests_reduced"] == len(chats) + preemptions and prefills["requests_unreduced"] == 0

    start = time.monotonic()
    alone = [send(client, model, chat) for chat in chats]
    print(
        f"the same one at a time: {time.monotonic() - start:.1f} s; max |d logprob| "
        f"{max_logprob_difference(alone, together):.3g}"
    )
    assert metric(server, PREEMPTIONS) - preempted == preemptions  # one request alone fits
    for chat, a, b in zip(chats, alone, together, strict=True):
        assert len(a.token_ids) == MAX_TOKENS
        assert (b.text, b.token_ids) == (a.text, a.token_ids), chat.options
    assert max_logprob_difference(alone, together) <= LOGPROB_TOLERANCE
