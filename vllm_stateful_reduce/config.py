"""Reduction settings: global from `--additional-config`, per request from `mm_processor_kwargs`.

    --additional-config '{"stateful_reduce": {"budget": 0.25, "schedule": "sigmoid"}}'
    mm_processor_kwargs={"stateful_reduce": {"budget": 0.5}}      # this request only

Every field is validated strictly; an invalid value is a ValueError naming the field
(HTTP 400 for a request), never a crash.
"""

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_KEY = "stateful_reduce"


class ReductionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    enabled: bool = True
    budget: float = Field(0.25, gt=0.0, le=1.0)
    """Depth-averaged fraction of visual tokens the language model processes
    (`budget_mode="depth_average"`, mean_l |V_l| / N_v), or the fraction left after
    the last stage (`"final_ratio"`)."""
    budget_mode: Literal["depth_average", "final_ratio"] = "depth_average"
    schedule: Literal["sigmoid", "step", "geometric"] | list[float] = "sigmoid"
    """`sigmoid`: r(l) = floor + (1 - floor) * sigmoid((l0 - l) / (temperature * depth)),
    l0 solved for the budget; `step`: all tokens until the first boundary, then one
    constant ratio; `geometric`: stage j keeps lambda^j (PyramidDrop-style staged
    decay), lambda solved for the budget; a list: the keep ratio of each stage."""
    sigmoid_floor: float = Field(0.05, ge=0.0, lt=1.0)
    sigmoid_temperature: float = Field(0.15, gt=0.0)
    boundaries: Literal["attention"] | list[int] = "attention"
    """Blocks after which tokens are dropped: after every attention block, or these
    block indices."""
    selection: Literal["scores", "random"] = "scores"
    """`random`: keep a seeded random subset of the same size (a baseline)."""
    score_layers: Literal["all", "attention", "mamba"] = "all"
    """Which blocks of a stage contribute scores: attention (softmax of the query rows),
    Mamba2 (C_Q . B_V proxy), or both."""
    score_norm: Literal["zscore", "sum"] = "zscore"
    """How a block's scores are put on a common scale before a stage sums them:
    `zscore` (minus the mean, over the standard deviation: every block gets the same
    say in the ranking) or `sum` (divided by their sum: a nearly flat block, such as
    softmax attention spread over a long prompt, then barely counts)."""
    mamba_decay: bool = False
    """Multiply the Mamba proxy by exp(A * sum dt) (the decay the paper drops)."""
    mamba_dt: bool = True
    """Weight the Mamba proxy of token s by its step size dt_s."""
    evs_rate: float = Field(0.0, ge=0.0, lt=1.0)
    """EVS-style pruning before the LLM: drop this fraction of the visual tokens that
    changed least since the previous frame (vLLM's EVS rule; the first frame stays).
    The in-LLM budget then applies to the tokens that remain."""
    min_keep: int = Field(16, ge=1)
    """Never keep fewer visual tokens than this per request (or all, if fewer)."""
    timing: bool = False
    """Time the phases of every forward (plan, metadata, scoring, selection, compaction)
    into the model's `reduction_state.timings`; synchronises the device per phase, so
    for measuring only. Global."""

    @field_validator("schedule")
    @classmethod
    def _ratios(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value or any(not 0.0 < r <= 1.0 for r in value):
                raise ValueError("explicit schedule ratios must be in (0, 1]")
            if any(b > a for a, b in zip(value, value[1:])):
                raise ValueError("explicit schedule ratios must not increase (dropped tokens never return)")
        return value

    @field_validator("boundaries")
    @classmethod
    def _sorted(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or any(b < 0 for b in value) or value != sorted(set(value))):
            raise ValueError("boundaries must be distinct, increasing, non-negative block indices")
        return value

    @model_validator(mode="after")
    def _explicit_schedule_matches(self) -> "ReductionConfig":
        if isinstance(self.schedule, list) and isinstance(self.boundaries, list):
            if len(self.schedule) != len(self.boundaries):
                raise ValueError(f"schedule has {len(self.schedule)} ratios for {len(self.boundaries)} boundaries")
        return self

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> "ReductionConfig":
        """This config with per-request `overrides` (only PER_REQUEST_FIELDS)."""
        if not overrides:
            return self
        unknown = set(overrides) - PER_REQUEST_FIELDS
        if unknown:
            raise ValueError(
                f"{CONFIG_KEY}: unknown per-request field(s) {sorted(unknown)}; allowed: {sorted(PER_REQUEST_FIELDS)}"
            )
        return parse(self.model_dump() | dict(overrides))


PER_REQUEST_FIELDS = {"enabled", "budget", "evs_rate"}


def parse(raw: Mapping[str, Any] | None) -> ReductionConfig:
    """Validate `raw`; errors become one ValueError that names each bad field."""
    if raw is not None and not isinstance(raw, Mapping):
        raise ValueError(f"{CONFIG_KEY}: expected an object, got {type(raw).__name__}")
    data = dict(raw or {})
    if isinstance(data.get("budget"), int) and not isinstance(data.get("budget"), bool):
        data["budget"] = float(data["budget"])  # JSON has no float/int distinction
    try:
        return ReductionConfig(**data)
    except ValidationError as err:
        details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in err.errors())
        raise ValueError(f"{CONFIG_KEY}: {details}") from None


def from_additional_config(additional_config: Mapping[str, Any] | None) -> ReductionConfig:
    """The global config from `vllm_config.additional_config`."""
    return parse((additional_config or {}).get(CONFIG_KEY))
