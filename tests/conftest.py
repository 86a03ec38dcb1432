"""Shared fixtures: one small checkpoint per session, vLLM pointed at a private temp dir."""

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

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from vllm_stateful_reduce import REQUIRED_ENGINE_ARGS  # noqa: E402
from vllm_stateful_reduce.media import video_metadata  # noqa: E402,F401  (used by the test modules)
from vllm_stateful_reduce.testing.checkpoint import build_checkpoint  # noqa: E402
from vllm_stateful_reduce.testing.tokenizer import chat_prompt  # noqa: E402,F401  (used by the test modules)

MAX_MODEL_LEN = 4096


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ckpt"))


def engine_kwargs(checkpoint: Path, **overrides) -> dict:
    """LLM(...) arguments for the tests: float32 (tight oracles), small memory."""
    return {
        "model": str(checkpoint),
        "dtype": "float32",
        "max_model_len": MAX_MODEL_LEN,
        "max_num_batched_tokens": MAX_MODEL_LEN,
        "gpu_memory_utilization": 0.3,
        "limit_mm_per_prompt": {"video": 2},
        "seed": 0,
        **REQUIRED_ENGINE_ARGS,
        # kernels/gpu_check.py: float32 on a GPU needs a backend that has it
        **(
            {"attention_backend": os.environ["VSR_TEST_ATTENTION_BACKEND"]}
            if "VSR_TEST_ATTENTION_BACKEND" in os.environ
            else {}
        ),
        **overrides,
    }


def random_video(num_frames: int, height: int = 80, width: int = 96, seed: int = 0) -> np.ndarray:
    """Random uint8 RGB frames (never constant), shape (T, H, W, 3)."""
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


def shutdown(llm) -> None:
    """Stop an LLM's engine process now, so the next module starts with free cores."""
    llm.llm_engine.engine_core.shutdown()
