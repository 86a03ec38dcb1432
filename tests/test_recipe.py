"""The model's published vLLM recipe, with `--plugin stateful-reduce` added and nothing else
changed, on a checkpoint shaped like the real one, asked what the recipe's clients ask.

One server: the recipe's flags (`testing.launch.RECIPE_FLAGS`: --trust-remote-code, EVS at
0.75, fps 2 / 128 frames, local media, no prefix caching, no preprocessor cache) and its
environment (the opencv video loader); `--max-model-len` is the recipe's memory knob. The
checkpoint (`build_recipe_checkpoint`) has the real config.json's fields and a remote-code
config module, so the plugin's config class must win over remote code. The clients put the
text before the media, as every recipe example does.
"""

import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image
from vllm.multimodal.video_prune.evs import compute_retained_tokens_count

from vllm_stateful_reduce.model.tokens import IMG_CONTEXT, IMG_START
from vllm_stateful_reduce.testing.checkpoint import build_recipe_checkpoint
from vllm_stateful_reduce.testing.launch import RECIPE_ENV, recipe_command, running_server
from vllm_stateful_reduce.testing.video_files import video_data_url, write_video

from .helpers import random_video
from .server_requests import metric, server_client

pytestmark = pytest.mark.engine

SERVED = "nemotron-nano-vl"  # --served-model-name
MAX_MODEL_LEN = 16384
EVS_RATE = 0.75  # the recipe's --video-pruning-rate
TOKENS_PER_FRAME = 256  # 512 px tiles and frames


@pytest.fixture(scope="module")
def recipe_checkpoint(tmp_path_factory):
    return build_recipe_checkpoint(tmp_path_factory.mktemp("recipe-ckpt"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 4 s video at 2 fps (8 frames), and two images: 300x700 (2x5 tiles + thumbnail)
    and 600x400 (3x2 + thumbnail)."""
    root = tmp_path_factory.mktemp("recipe-media")
    video = random_video(8, 96, 128, seed=11)
    video[4:6] = video[3]  # static frames: EVS drops their tokens first
    write_video(video, root / "clip.mp4", fps=2.0)
    rng = np.random.default_rng(5)
    for name, (h, w) in {"tall.png": (700, 300), "wide.png": (400, 600)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    return root


@pytest.fixture(scope="module")
def server(recipe_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("recipe-logs") / "serve.log"
    command = lambda port: recipe_command(recipe_checkpoint, port, MAX_MODEL_LEN, SERVED)  # noqa: E731
    with running_server(recipe_checkpoint, log_path=log, command=command, extra_env=RECIPE_ENV, timeout=400) as url:
        yield url


def image_url(path) -> dict:
    return {"type": "image_url", "image_url": {"url": f"file://{path}"}}


def video_url(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def ask(server: str, parts: list[dict], stream: bool = False) -> str:
    """The recipe's client shape: the question first, then the media. Greedy, short."""
    client = server_client(server)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe what you see."}, *parts]}]
    reply = client.chat.completions.create(
        model=SERVED, messages=messages, max_tokens=4, temperature=0.0, stream=stream
    )
    if stream:
        chunks = list(reply)
        assert chunks and chunks[-1].choices[0].finish_reason == "length"
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4
    return reply.choices[0].message.content


def prompt_ids(server: str, parts: list[dict]) -> list[int]:
    """The processed prompt (media expanded) from the server's own `/tokenize`."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe what you see."}, *parts]}]
    body = {"model": SERVED, "messages": messages, "add_generation_prompt": True}
    reply = requests.post(server + "/tokenize", json=body, timeout=120)
    reply.raise_for_status()
    return reply.json()["tokens"]


def token(server: str, text: str) -> int:
    reply = requests.post(server + "/tokenize", json={"model": SERVED, "prompt": text, "add_special_tokens": False})
    (only,) = reply.json()["tokens"]
    return only


def test_video_prompt_is_as_short_as_in_tree_evs(server, files) -> None:
    """`--video-pruning-rate 0.75` shortens the prompt to vLLM's retained count (in-tree's
    length), not 256 tokens per frame. The recipe's question comes before the video, so
    the prompt is then served unreduced by default (`question_before_media`): counted, in
    every stage, with all of what entered the LLM after EVS."""
    ids = prompt_ids(server, [video_url(f"file://{files / 'clip.mp4'}")])
    frames = ids.count(token(server, IMG_START))
    assert frames == 8  # 4 s at 2 fps (--media-io-kwargs fps 2, up to 128 frames)
    visual = ids.count(token(server, IMG_CONTEXT))
    assert visual == compute_retained_tokens_count(TOKENS_PER_FRAME, frames, EVS_RATE) == 512
    unreduced = "vllm:stateful_reduce_requests_unreduced_total"
    before = metric(server, unreduced, reason="question_before_media")
    last_stage = metric(server, "vllm:stateful_reduce_visual_tokens_kept_total", stage="6")
    assert ask(server, [video_url(f"file://{files / 'clip.mp4'}")])
    assert metric(server, unreduced, reason="question_before_media") == before + 1
    assert metric(server, "vllm:stateful_reduce_visual_tokens_kept_total", stage="6") == last_stage + visual


@pytest.mark.parametrize(
    "kind", ["video data URL", "image", "two images", "image + video", "streamed video"], ids=lambda k: k
)
def test_recipe_client_requests_answer(server, files, kind: str) -> None:
    video_file = files / "clip.mp4"
    parts = {
        "video data URL": [video_url(video_data_url(video_file))],
        "image": [image_url(files / "tall.png")],
        "two images": [image_url(files / "tall.png"), image_url(files / "wide.png")],
        "image + video": [image_url(files / "wide.png"), video_url(f"file://{video_file}")],
        "streamed video": [video_url(f"file://{video_file}")],
    }[kind]
    assert isinstance(ask(server, parts, stream=kind.startswith("streamed")), str)


def test_images_are_tiled_as_in_tree(server, files) -> None:
    """A 300x700 image: 2x5 tiles + a thumbnail, 256 tokens each, in `<img>...</img>`."""
    ids = prompt_ids(server, [image_url(files / "tall.png")])
    assert ids.count(token(server, IMG_CONTEXT)) == 11 * TOKENS_PER_FRAME
    assert ids.count(token(server, IMG_START)) == 1


def test_image_only_requests_are_counted_as_not_reduced(server, files) -> None:
    """Images are not reduced by default (`modalities`): said on /metrics, not silently."""
    before = metric(server, "vllm:stateful_reduce_requests_unreduced_total", reason="modality_not_reduced")
    ask(server, [image_url(files / "wide.png")])
    after = metric(server, "vllm:stateful_reduce_requests_unreduced_total", reason="modality_not_reduced")
    assert after == before + 1


def test_data_url_image_equals_file_image(server, files) -> None:
    """The same PNG as a data URL gives the same prompt (pixels decode alike)."""
    png = base64.b64encode((files / "wide.png").read_bytes()).decode()
    as_data = prompt_ids(server, [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}])
    assert as_data == prompt_ids(server, [image_url(files / "wide.png")])
    Image.open(io.BytesIO(base64.b64decode(png))).verify()
