"""Scale-out on vLLM's own mechanisms: `--data-parallel-size 2` behind one API server.

Two engine cores (one CPU core each) serve the same requests as one engine: the greedy
tokens must be identical and their log-probabilities equal within 1e-4 (float32; the
batches differ), and the plugin's
Prometheus counters (summed from every process by the CLI entry's multiprocess mode)
must show both engines reducing. Kept positions live in each engine's worker and are
not visible through a server; equal log-probs across the whole answer imply the same
kept tokens (tests/test_tensor_parallel.py checks kept positions rank by rank).

Tensor parallel over Ray (`--distributed-executor-backend ray`) cannot run on this
build: vLLM 0.32's Ray executor refuses the CPU platform ("current platform cpu does not
support ray": `CpuPlatform.ray_device_key` is empty, vllm/v1/executor/ray_utils.py).
"""

import os
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from vllm_stateful_reduce.testing.launch import running_server
from vllm_stateful_reduce.testing.video_files import video_data_url, write_video

from .helpers import random_video, video_part
from .server_requests import server_client

pytestmark = pytest.mark.engine  # starts a vLLM engine or server

QUESTIONS = ("What is shown?", "Which colour comes first?", "How many squares?", "What moves?")
COMMON = ["--dtype", "float32", "--gpu-memory-utilization", "0.1"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    urls = []
    for i in range(len(QUESTIONS)):
        path = root / f"v{i}.mp4"
        write_video(random_video(10 + 2 * i, seed=40 + i), path, fps=2.0)
        urls.append(video_data_url(path))
    return urls


def answers(url: str, videos: list[str]) -> list[tuple[list[int], list[float]]]:
    """(token ids, log-probs) of each request, sent concurrently (DP spreads them)."""
    client = server_client(url)
    model = client.models.list().data[0].id

    def ask(i: int):
        reply = client.chat.completions.create(
            model=model,
            max_tokens=6,
            temperature=0.0,
            logprobs=True,
            messages=[{"role": "user", "content": [video_part(videos[i]), {"type": "text", "text": QUESTIONS[i]}]}],
            extra_body={"return_token_ids": True},
        )
        choice = reply.choices[0]
        return list(choice.token_ids), [t.logprob for t in choice.logprobs.content]

    with ThreadPoolExecutor(len(videos)) as pool:
        return list(pool.map(ask, range(len(videos))))


def reduced_per_engine(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    found = re.findall(r"^vllm:stateful_reduce_requests_reduced_total\{([^}]*)\} (\S+)$", text, re.M)
    per_engine: dict[str, float] = {}
    for labels, value in found:  # summed over `query`
        engine = re.search(r'engine="(\d+)"', labels).group(1)
        per_engine[engine] = per_engine.get(engine, 0.0) + float(value)
    return per_engine


def test_data_parallel_2_serves_as_one_engine(real_layout_checkpoint, videos, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per engine on this 2-core machine
    with running_server(
        real_layout_checkpoint, log_path=tmp_path / "dp2.log", extra=[*COMMON, "--data-parallel-size", "2"], timeout=400
    ) as url:
        parallel = answers(url, videos)
        engines = reduced_per_engine(url)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    with running_server(real_layout_checkpoint, log_path=tmp_path / "dp1.log", extra=COMMON) as url:
        single = answers(url, videos)
    assert [tokens for tokens, _ in parallel] == [tokens for tokens, _ in single]
    # concurrent requests batch differently on one engine and on two, so float32 sums may
    # differ in the last bits; a different kept set would move log-probs far more than this
    delta = max(abs(a - b) for (_, x), (_, y) in zip(parallel, single, strict=True) for a, b in zip(x, y, strict=True))
    assert delta <= 1e-4, delta
    assert set(engines) == {"0", "1"} and all(n >= 1 for n in engines.values()), engines
    assert sum(engines.values()) == len(videos), engines
    print(
        f"DP=2: reduced requests per engine {engines}; tokens identical to one engine's, max |delta logprob| "
        f"{delta:.2e}"
    )
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ  # the CLI entry set it for the server only
