"""`vllm serve` with the plugin, driven by the official openai client (one server per module).

The checkpoint is laid out like the real one (architecture `NemotronH_Nano_VL_V2`,
remote-code `auto_map`), and the plugin architecture is chosen with --hf-overrides,
exactly as a user does with the real checkpoint.
"""

import base64
import json
import os
import shutil

import cv2
import openai
import pytest
import requests

from vllm_stateful_reduce.launch import running_server
from vllm_stateful_reduce.media import video_data_url, write_video

from .conftest import random_video


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    write_video(random_video(6, seed=1), root / "ok.mp4", fps=2.0)
    empty = cv2.VideoWriter(str(root / "empty.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 2.0, (96, 80))
    empty.release()  # a container with zero frames
    return root


@pytest.fixture(scope="module")
def real_layout_checkpoint(checkpoint, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("real-layout")
    shutil.copytree(checkpoint, ckpt, dirs_exist_ok=True)
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["NemotronH_Nano_VL_V2"]
    config["auto_map"] = {"AutoConfig": "configuration.NemotronH_Nano_VL_V2_Config"}  # not shipped
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


@pytest.fixture(scope="module")
def server(real_layout_checkpoint, media, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    extra = ["--dtype", "float32", "--gpu-memory-utilization", "0.3", "--allowed-local-media-path", str(media),
             "--limit-mm-per-prompt", '{"video": 2}', "--trust-request-mm-kwargs"]  # fmt: skip
    with running_server(real_layout_checkpoint, log_path=log, extra=extra) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def ask(client, part: dict, question: str = "What is shown?"):
    model = client.models.list().data[0].id
    return client.chat.completions.create(
        model=model, max_tokens=6, temperature=0.0,
        messages=[{"role": "user", "content": [part, {"type": "text", "text": question}]}],
    )  # fmt: skip


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


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
            model=model, max_tokens=4, temperature=0.0,
            messages=[{"role": "user", "content": [part, {"type": "text", "text": "Where is it?"}]}],
            extra_body={"mm_processor_kwargs": {"stateful_reduce": options}},
        )  # fmt: skip

    assert chat({"budget": 0.5, "enabled": True}).choices[0].message.content is not None
    for bad, field in (({"budget": 2}, "budget"), ({"schedule": "step"}, "schedule"), ({"enabled": "maybe"}, "enabled")):
        with pytest.raises(openai.BadRequestError) as err:
            chat(bad)
        assert err.value.status_code == 400 and field in str(err.value.message), err.value.message
    assert requests.get(server + "/health", timeout=5).status_code == 200
