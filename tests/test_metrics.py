"""The plugin's Prometheus figures on the server's `/metrics` (one real server).

Known requests go in (reduced at the default and at an overridden budget, reduction
turned off, an infeasible budget, a budget with nothing to drop, the question before the
video - unreduced by default, reduced when asked - and text only); the figures
read back from `/metrics` must equal what the schedule says for them. The oracle: the
prompt's visual tokens counted in the token ids the server's own `/tokenize` returns for
the same messages, and the schedule's keep counts for each request's settings; KV
blocks not allocated follow from those, the prompt's length and vLLM's block size.
"""

import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from vllm_stateful_reduce.config import parse
from vllm_stateful_reduce.schedule import build_schedule, stage_of
from vllm_stateful_reduce.testing.checkpoint import CheckpointSpec
from vllm_stateful_reduce.testing.video_files import video_data_url, write_video

from .helpers import random_video, video_part
from .server_requests import server_client, server_with_metrics, visual_tokens

pytestmark = pytest.mark.engine  # starts a vLLM engine or server

PREFIX = "vllm:stateful_reduce_"
FRAMES = 32  # the video loader samples up to 32: a reduced prompt then needs fewer 128-token KV blocks
QUESTION = "What happens in this video?"
# (per-request options, question first?) -> why it is served unreduced, or (None) what scored its reduction
REQUESTS = {
    "default": ({}, False, None, "question"),
    "budget 0.5": ({"budget": 0.5}, False, None, "question"),
    "off": ({"enabled": False}, False, "disabled", None),
    "infeasible": ({"budget": 0.1}, False, "infeasible", None),  # below the 13-block pattern's smallest depth average
    "keep all": ({"budget": 1.0}, False, "nothing_to_drop", None),
    "question first": ({}, True, "question_before_media", None),
    "question first, reduced": ({"reduce_question_before_media": True}, True, None, "template_tail"),
}


@pytest.fixture(scope="module")
def video_url(tmp_path_factory) -> str:
    path = write_video(random_video(FRAMES, seed=7), tmp_path_factory.mktemp("media") / "clip.mp4", fps=2.0)
    return video_data_url(path)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """A server in Prometheus multiprocess mode (a fresh directory), as metrics.py needs."""
    with server_with_metrics(checkpoint, tmp_path_factory) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return server_client(server)


def plugin_figures(server: str) -> dict[tuple, float]:
    """The plugin's counters on /metrics: (name, labels without model/engine) -> value,
    and the model/engine label pairs seen (under the key "labels")."""
    text = requests.get(server + "/metrics", timeout=10).text
    figures, labels = {}, set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(PREFIX) and sample.name.endswith("_total"):
                rest = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in ("model_name", "engine")))
                figures[(sample.name, rest)] = figures.get((sample.name, rest), 0.0) + sample.value
                labels.add((sample.labels["model_name"], sample.labels["engine"]))
    figures["labels"] = labels
    return figures


def cache_block_size(server: str) -> int:
    """The KV-cache manager's attention block size, from vLLM's `cache_config_info`."""
    text = requests.get(server + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("vllm:cache_config_info"):
                return int(sample.labels["block_size"])
    raise AssertionError("no vllm:cache_config_info on /metrics")


def messages(video_url: str | None, question_first: bool = False) -> list[dict]:
    content = [{"type": "text", "text": QUESTION}]
    if video_url is not None:
        content.insert(len(content) if question_first else 0, video_part(video_url))
    return [{"role": "user", "content": content}]


def test_figures_match_the_requests(client, server, video_url) -> None:
    model = client.models.list().data[0].id
    pattern = CheckpointSpec().pattern
    num_visual = visual_tokens(server, model, video_url)
    assert num_visual >= FRAMES * 4  # frames of (64/16)^2 / 4 tokens each, unless the loader samples more
    num_stages = len(build_schedule(pattern, parse({})).boundaries) + 1

    expected: dict[tuple, float] = {}

    def add(name: str, value: float, **labels: str) -> None:
        key = (PREFIX + name + "_total", tuple(sorted(labels.items())))
        expected[key] = expected.get(key, 0.0) + value

    def not_allocated(prompt_tokens: int, keep: list[int], boundaries: list[int]) -> int:
        """KV blocks a reduced prefill does not get: per attention layer's stage (its own
        KV-cache group), blocks for the whole prompt minus blocks for the rows it keeps."""
        stages = [stage_of(block, boundaries) for block, kind in enumerate(pattern) if kind == "*"]
        whole = -(-prompt_tokens // block_size)
        return sum(whole - -(-(prompt_tokens - (num_visual - keep[j])) // block_size) for j in stages)

    block_size = cache_block_size(server)
    prompt_tokens = {}
    before = plugin_figures(server)
    start = time.monotonic()
    for name, (options, question_first, _, _) in REQUESTS.items():
        out = client.chat.completions.create(
            model=model,
            max_tokens=3,
            temperature=0.0,
            messages=messages(video_url, question_first),
            extra_body={"mm_processor_kwargs": {"stateful_reduce": options}},
        )
        assert out.choices[0].finish_reason
        prompt_tokens[name] = out.usage.prompt_tokens
    text_only = client.chat.completions.create(model=model, max_tokens=3, messages=messages(None))
    assert text_only.choices[0].finish_reason
    elapsed = time.monotonic() - start
    after = plugin_figures(server)

    for name, (options, _, reason, query) in REQUESTS.items():
        add("visual_tokens", num_visual)
        if reason is None:
            config = parse(options)
            schedule = build_schedule(pattern, config)
            keep = schedule.keep_counts(num_visual, config.min_keep)
            assert keep[0] == num_visual > keep[-1]  # something is dropped
            add("requests_reduced", 1, query=query)
            blocks = not_allocated(prompt_tokens[name], keep, schedule.boundaries)
            if blocks:
                add("kv_blocks_not_allocated", blocks)
        else:
            keep = [num_visual] * num_stages
            add("requests_unreduced", 1, reason=reason)
        for stage, k in enumerate(keep):
            add("visual_tokens_kept", k, stage=str(stage))

    assert expected[(PREFIX + "kv_blocks_not_allocated_total", ())] > 0  # the path under test
    assert after["labels"] == {(model, "0")}, after["labels"]
    # multiprocess mode keeps vLLM's own figures (made in the API server) on /metrics
    assert "vllm:prompt_tokens_total{" in requests.get(server + "/metrics", timeout=10).text
    counts = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after if k != "labels" and "work_seconds" not in k[0]}
    got = {k: v for k, v in counts.items() if v}
    print("expected:", sorted(expected.items()))
    print("got:     ", sorted(got.items()))
    assert got == expected

    work = {
        dict(k[1])["phase"]: after[k] - before.get(k, 0.0) for k in after if k != "labels" and "work_seconds" in k[0]
    }
    print("reduction work seconds:", work, "of", round(elapsed, 2), "s of requests")
    assert set(work) == {"plan", "metadata", "scoring", "selection", "compaction"}
    assert all(v > 0 for v in work.values()), work  # two reduced prefills ran every phase
    assert sum(work.values()) < elapsed
