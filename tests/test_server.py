"""`vllm serve` with the plugin, driven by the official openai client (one server per module).

The checkpoint is laid out like the real one (architecture `NemotronH_Nano_VL_V2`,
remote-code `auto_map`), and the plugin architecture is chosen with --hf-overrides,
exactly as a user does with the real checkpoint.
"""

import base64
import json
import os
import re
import subprocess
import time

import openai
import pytest
import requests

from vllm_stateful_reduce.testing.launch import free_port, running_server, serve_command
from vllm_stateful_reduce.testing.video_files import video_data_url

from .helpers import ask, video_part
from .server_requests import server_client

pytestmark = pytest.mark.engine  # starts a vLLM engine or server


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    """The server's captured stdout + stderr (front end, engine core, worker)."""
    return tmp_path_factory.mktemp("logs") / "serve.log"


@pytest.fixture(scope="module")
def server(real_layout_checkpoint, media, server_log):
    extra = ["--dtype", "float32", "--gpu-memory-utilization", "0.3", "--allowed-local-media-path", str(media),
             "--limit-mm-per-prompt", '{"video": 2}', "--trust-request-mm-kwargs"]  # fmt: skip
    with running_server(real_layout_checkpoint, log_path=server_log, extra=extra) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return server_client(server)


def test_video_by_data_url_and_by_local_file(client, media) -> None:
    by_data = ask(client, video_part(video_data_url(media / "ok.mp4")))
    by_file = ask(client, video_part(f"file://{media / 'ok.mp4'}"))
    assert by_data.choices[0].message.content.strip()
    # same video, same prompt, greedy: same tokens either way
    assert by_data.choices[0].message.content == by_file.choices[0].message.content
    assert by_data.usage.prompt_tokens == by_file.usage.prompt_tokens > 6 * 4


BAD_PARTS = {
    "corrupt bytes": video_part("data:video/mp4;base64," + base64.b64encode(os.urandom(4096)).decode()),
    "zero frames": "empty.mp4",
    "unknown media type": video_part("data:application/x-unknown;base64," + base64.b64encode(b"hello").decode()),
    "image for a video-only model": {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    "file outside --allowed-local-media-path": video_part("file:///etc/hostname"),
    "unsupported URL scheme": video_part("ftp://example.invalid/video.mp4"),
}


@pytest.mark.parametrize("case", list(BAD_PARTS))
def test_bad_request_is_400_and_server_keeps_serving(client, server, media, case) -> None:
    part = BAD_PARTS[case]
    if part == "empty.mp4":
        part = video_part(video_data_url(media / "empty.mp4"))
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, part)
    assert err.value.status_code == 400
    message = str(err.value.message)
    print(f"{case}: 400 {message[:120]}")
    assert len(message) > 10
    assert requests.get(server + "/health", timeout=5).status_code == 200
    ok = ask(client, video_part(video_data_url(media / "ok.mp4")))
    assert ok.choices[0].message.content.strip()


def test_per_request_reduction_options(client, server, media) -> None:
    part = video_part(video_data_url(media / "ok.mp4"))
    model = client.models.list().data[0].id

    def chat(options):
        return client.chat.completions.create(
            model=model,
            max_tokens=4,
            temperature=0.0,
            messages=[{"role": "user", "content": [part, {"type": "text", "text": "Where is it?"}]}],
            extra_body={"mm_processor_kwargs": {"stateful_reduce": options}},
        )

    assert chat({"budget": 0.5, "enabled": True}).choices[0].message.content is not None
    for bad, field in (
        ({"budget": 2}, "budget"),
        ({"schedule": "step"}, "schedule"),
        ({"enabled": "maybe"}, "enabled"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            chat(bad)
        assert err.value.status_code == 400 and field in str(err.value.message), err.value.message
    assert requests.get(server + "/health", timeout=5).status_code == 200


# Invalid per-request options (what the plugin's message must name), as sent through
# the openai client's extra_body. NaN is not JSON and the openai client refuses to send it;
# Python's json.dumps writes it as `NaN`, which vLLM's request parser accepts.
INVALID_OPTIONS = {
    "budget 1.5": ({"budget": 1.5}, "stateful_reduce.budget must be in (0, 1], got 1.5"),
    "budget 0": ({"budget": 0}, "stateful_reduce.budget must be in (0, 1], got 0"),
    "budget 'abc'": ({"budget": "abc"}, "stateful_reduce.budget"),
    "budget null": ({"budget": None}, "stateful_reduce.budget"),
    "budget NaN": ({"budget": float("nan")}, "stateful_reduce.budget"),
    "unknown key": ({"bugdet": 0.5}, "stateful_reduce.bugdet"),
    "global-only key": ({"schedule": "step"}, "stateful_reduce.schedule cannot be set per request"),
    "list, not an object": ([0.5], "stateful_reduce must be an object"),
    "evs_rate -0.2": ({"evs_rate": -0.2}, "stateful_reduce.evs_rate must be in [0, 1), got -0.2"),
    "evs_rate 1.0": ({"evs_rate": 1.0}, "stateful_reduce.evs_rate must be in [0, 1), got 1.0"),
}


def chat_body(model: str, content, options) -> dict:
    return {
        "model": model,
        "max_tokens": 4,
        "temperature": 0.0,
        "messages": [{"role": "user", "content": content}],
        "mm_processor_kwargs": {"stateful_reduce": options},
    }


@pytest.mark.parametrize("with_video", [True, False], ids=["1MB-video", "text-only"])
def test_invalid_options_are_a_short_400_naming_the_field(client, server, media, with_video) -> None:
    model = client.models.list().data[0].id
    content = "What is shown?"
    if with_video:
        content = [video_part(video_data_url(media / "big.mp4")), {"type": "text", "text": content}]
    for case, (options, expected) in INVALID_OPTIONS.items():
        body = chat_body(model, content, options)
        if case == "budget NaN":  # not JSON: the openai client refuses to send it
            response = requests.post(
                server + "/v1/chat/completions",
                data=json.dumps(body),
                headers={"Content-Type": "application/json"},
                timeout=60,
            )
            status, raw = response.status_code, response.content
            message = response.json()["error"]["message"]
        else:
            with pytest.raises(openai.BadRequestError) as err:
                client.chat.completions.create(
                    **{k: v for k, v in body.items() if k != "mm_processor_kwargs"},
                    extra_body={"mm_processor_kwargs": body["mm_processor_kwargs"]},
                )
            status, raw, message = err.value.status_code, err.value.response.content, str(err.value.message)
        print(f"{case}: {status} ({len(raw)} bytes) {message}")
        assert status == 400, case
        assert expected in message, (case, message)
        assert len(raw) < 2048 and b"Failed to apply" not in raw, (case, len(raw))
        ok = client.chat.completions.create(model=model, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
        assert ok.choices[0].finish_reason  # still serving


def log_lines(log, pattern: str) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if re.search(pattern, line)]


def test_plugin_logs_reach_the_server_output(client, server, server_log, media) -> None:
    # at start-up, one line (local rank 0) with the global reduction config
    startup = log_lines(server_log, r"stateful_reduce: token reduction on: enabled=True budget=0\.25 ")
    assert len(startup) == 1 and "stage keep ratios" in startup[0], startup
    # a per-request budget the 13-block pattern cannot reach: served unreduced, logged at
    # most once per reason a minute (the next request's line is held back)
    unreduced = r"served unreduced: infeasible: budget: 0\.05"
    before = len(log_lines(server_log, unreduced))
    part = video_part(video_data_url(media / "ok.mp4"))
    model = client.models.list().data[0].id
    for _ in range(2):
        out = client.chat.completions.create(
            model=model,
            max_tokens=2,
            messages=[{"role": "user", "content": [part, {"type": "text", "text": "Where?"}]}],
            extra_body={"mm_processor_kwargs": {"stateful_reduce": {"budget": 0.05}}},
        )
        assert out.choices[0].finish_reason
    deadline = time.monotonic() + 10
    while len(log_lines(server_log, unreduced)) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = log_lines(server_log, unreduced)
    assert len(lines) == before + 1, lines
    assert " INFO " in lines[-1] and "request chatcmpl-" in lines[-1], lines[-1]


def test_invalid_global_option_stops_serve_with_the_field(real_layout_checkpoint, tmp_path) -> None:
    """`--additional-config` is checked while vLLM builds its config: no engine starts."""
    bad = json.dumps({"stateful_reduce": {"budget": 1.5}})
    cmd = serve_command(real_layout_checkpoint, free_port(), extra=["--additional-config", bad])
    env = {**os.environ, "VLLM_PLUGINS": os.environ.get("VLLM_PLUGINS", "stateful_reduce")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode != 0
    assert "stateful_reduce.budget must be in (0, 1], got 1.5" in done.stdout + done.stderr, done.stderr[-3000:]
