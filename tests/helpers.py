"""Helper functions shared by the test modules (fixtures live in conftest.py)."""

import os
from pathlib import Path

import numpy as np

from vllm_stateful_reduce import REQUIRED_ENGINE_ARGS
from vllm_stateful_reduce.media import video_metadata
from vllm_stateful_reduce.testing.tokenizer import chat_prompt

__all__ = [
    "LONG_MODEL",
    "MAX_MODEL_LEN",
    "REPO",
    "SMALL_MODEL",
    "ask",
    "chat_prompt",
    "engine_kwargs",
    "random_video",
    "shutdown",
    "video_metadata",
    "video_part",
    "video_prompt",
    "preemptions",
]

MAX_MODEL_LEN = 4096
REPO = Path(__file__).resolve().parent.parent
SMALL_MODEL = REPO / "models" / "video-qa-small"  # the committed models, trained here
LONG_MODEL = REPO / "models" / "video-qa-long"


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


def video_part(url: str) -> dict:
    """An OpenAI chat content part holding a video URL."""
    return {"type": "video_url", "video_url": {"url": url}}


def ask(client, part: dict, question: str = "What is shown?"):
    """One short greedy chat completion about `part` through the openai client."""
    model = client.models.list().data[0].id
    return client.chat.completions.create(
        model=model,
        max_tokens=6,
        temperature=0.0,
        messages=[{"role": "user", "content": [part, {"type": "text", "text": question}]}],
    )


def video_prompt(
    video: np.ndarray | None,
    question: str = "Which frame shows the red square?",
    options: dict | None = None,
    order: str = "video_first",
) -> dict:
    """An offline prompt asking `question` about `video` (None: text only), with
    per-request reduction `options`."""
    if video is None:
        return {"prompt": chat_prompt(question, with_video=False)}
    prompt = chat_prompt(question, order=order)
    out = {"prompt": prompt, "multi_modal_data": {"video": (video, video_metadata(len(video)))}}
    if options is not None:
        out["mm_processor_kwargs"] = {"stateful_reduce": options}
    return out


def preemptions(llm) -> int:
    """vLLM's preemption count of an offline engine (needs disable_log_stats=False)."""
    return int(sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"))
