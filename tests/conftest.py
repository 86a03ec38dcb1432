"""Test environment and shared fixtures: vLLM pointed at a private temp dir, one small
checkpoint per session. Helper functions are in helpers.py."""

import os
import tempfile
from pathlib import Path

# Before vLLM is imported anywhere: plugin allow-list, IPC sockets in a private dir,
# a small CPU KV cache, and callables allowed through collective_rpc.
_RUN_TMP = tempfile.mkdtemp(prefix="vsr-tests-")
os.environ.setdefault("VLLM_PLUGINS", "stateful_reduce")
os.environ["TMPDIR"] = _RUN_TMP
os.environ["VLLM_RPC_BASE_PATH"] = _RUN_TMP
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
tempfile.tempdir = _RUN_TMP

import json  # noqa: E402
import shutil  # noqa: E402

import cv2  # noqa: E402
import pytest  # noqa: E402

from vllm_stateful_reduce.testing.checkpoint import build_checkpoint  # noqa: E402
from vllm_stateful_reduce.testing.encoding import Encoder  # noqa: E402
from vllm_stateful_reduce.testing.oracle import ReferenceNanoVL  # noqa: E402
from vllm_stateful_reduce.testing.video_files import write_video  # noqa: E402

from .helpers import SMALL_MODEL, random_video  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def reference(checkpoint) -> ReferenceNanoVL:
    """The plain-PyTorch oracle on the session's checkpoint."""
    return ReferenceNanoVL(checkpoint)


@pytest.fixture(scope="module")
def small_model() -> ReferenceNanoVL:
    """The plain-PyTorch reference on the committed trained model."""
    return ReferenceNanoVL(SMALL_MODEL)


@pytest.fixture(scope="module")
def small_encoder() -> Encoder:
    """Prompts and pixels for the committed trained model, as its server builds them."""
    return Encoder(SMALL_MODEL)


@pytest.fixture(scope="module")
def real_layout_checkpoint(checkpoint, tmp_path_factory):
    """The checkpoint as the real one names itself (`NemotronH_Nano_VL_V2`, remote-code
    `auto_map`), so the plugin architecture is chosen the way a user does."""
    ckpt = tmp_path_factory.mktemp("real-layout")
    shutil.copytree(checkpoint, ckpt, dirs_exist_ok=True)
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["NemotronH_Nano_VL_V2"]
    config["model_type"] = "NemotronH_Nano_VL_V2"
    config["auto_map"] = {"AutoConfig": "configuration.NemotronH_Nano_VL_V2_Config"}  # not shipped
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Video files for server tests: ok.mp4, empty.mp4 (no frames), big.mp4 (~1 MB)."""
    root = tmp_path_factory.mktemp("media")
    write_video(random_video(6, seed=1), root / "ok.mp4", fps=2.0)
    empty = cv2.VideoWriter(str(root / "empty.mp4"), cv2.VideoWriter.fourcc(*"mp4v"), 2.0, (96, 80))
    empty.release()  # a container with zero frames
    write_video(random_video(60, 240, 320, seed=2), root / "big.mp4", fps=2.0)  # noise: ~1 MB as MPEG-4
    assert (root / "big.mp4").stat().st_size > 900_000
    return root
