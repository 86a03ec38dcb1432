"""What travels with a request's media from the processor (and the vision tower) to the
runner glue, which hands it to the reduction planner.

- Per-request reduction options (`mm_processor_kwargs["stateful_reduce"]`) and each
  video's EVS rate ride as per-item multimodal fields, kept with the request's
  multimodal features. vLLM casts floating-point fields to the model's dtype (bf16 would
  turn a budget of 0.35 into 0.3496), so the values travel as the int64 bit patterns of
  float64 (`float_bits`), one per field of OPTION_NAMES (NaN: not set).
- An EVS video's real prompt layout is only known after the vision tower (model/evs.py):
  it is recorded on the embedding tensor, which the runner keeps in its encoder cache.
"""

from collections.abc import Mapping
from typing import Any

import torch

from .config import PER_REQUEST_FIELDS, ReductionConfig

OPTIONS_FIELD = "stateful_reduce_options"
IMAGE_OPTIONS_FIELD = "stateful_reduce_options_image"
EVS_FIELD = "stateful_reduce_evs_rate"
OPTION_NAMES = tuple(sorted(PER_REQUEST_FIELDS))
_BOOLEAN_OPTIONS = {k for k in OPTION_NAMES if ReductionConfig.model_fields[k].annotation is bool}
_LAYOUT = "_stateful_reduce_prompt_ids"


def float_bits(values: torch.Tensor) -> torch.Tensor:
    """float64 values as their int64 bit patterns (survive vLLM's dtype cast)."""
    return values.to(torch.float64).view(torch.int64)


def float_values(bits: torch.Tensor) -> list[float]:
    """What `float_bits` encoded, flattened."""
    return bits.flatten().view(torch.float64).tolist()


def encode_options(options: Mapping[str, Any] | None) -> torch.Tensor:
    """Validated per-request options (`config.request_overrides`) as one tensor."""
    overrides = options or {}
    values = [float("nan") if overrides.get(k) is None else float(overrides[k]) for k in OPTION_NAMES]
    return float_bits(torch.tensor(values, dtype=torch.float64))


def decode_options(encoded: torch.Tensor) -> dict | None:
    values = float_values(encoded)
    out = {k: bool(v) if k in _BOOLEAN_OPTIONS else v for k, v in zip(OPTION_NAMES, values, strict=True) if v == v}
    return out or None  # NaN: not given


def record_layout(embeddings: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Attach an EVS video's real prompt ids to its embeddings."""
    setattr(embeddings, _LAYOUT, ids)
    return embeddings


def recorded_layout(embeddings: object) -> list[int] | None:
    """The prompt ids recorded with an EVS video's embeddings (None: not an EVS video)."""
    return getattr(embeddings, _LAYOUT, None)
