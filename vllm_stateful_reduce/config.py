"""Reduction settings: global from `--additional-config`, per request from `mm_processor_kwargs`.

    --additional-config '{"stateful_reduce": {"budget": 0.25, "schedule": "sigmoid"}}'
    mm_processor_kwargs={"stateful_reduce": {"budget": 0.5}}      # this request only

Every field is validated strictly; an invalid value is a `ConfigError` (a ValueError)
with one short message per bad field that names it, says what is allowed and shows
(truncated) what was received, e.g. `stateful_reduce.budget must be in (0, 1], got 1.5`.
A request gets it as HTTP 400 (see `adapter.request_checks.RequestError`), never a crash.
"""

import json
from collections.abc import Iterable, Mapping
from itertools import pairwise
from typing import Any, Literal, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

CONFIG_KEY = "stateful_reduce"


class ConfigError(ValueError):
    """Invalid reduction settings. `fields` names the offending fields (empty when the
    problem is the settings as a whole)."""

    def __init__(self, message: str, fields: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.fields = tuple(fields)


class ReductionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    enabled: bool = Field(True, description="reduce at all")
    budget: float = Field(
        0.25,
        gt=0.0,
        le=1.0,
        description='depth-averaged kept fraction (or the final fraction with `budget_mode: "final_ratio"`)',
    )
    """Depth-averaged fraction of visual tokens the language model processes
    (`budget_mode="depth_average"`, mean_l |V_l| / N_v), or the fraction left after
    the last stage (`"final_ratio"`)."""
    budget_mode: Literal["depth_average", "final_ratio"] = Field(
        "depth_average",
        description='what `budget` means: `"depth_average"` or `"final_ratio"` (kept after the last stage)',
    )
    schedule: Literal["sigmoid", "step", "geometric"] | list[float] = Field(
        "sigmoid",
        description='`"sigmoid"`, `"step"` (one ratio after the first boundary), `"geometric"` (stage j keeps λ^j) '
        "or a list of per-stage ratios",
    )
    """`sigmoid`: r(l) = floor + (1 - floor) * sigmoid((l0 - l) / (temperature * depth)),
    l0 solved for the budget; `step`: all tokens until the first boundary, then one
    constant ratio; `geometric`: stage j keeps lambda^j (PyramidDrop-style staged
    decay), lambda solved for the budget; a list: the keep ratio of each stage."""
    sigmoid_floor: float = Field(
        0.05, ge=0.0, lt=1.0, description="shape of the sigmoid schedule: the ratio it falls to"
    )
    sigmoid_temperature: float = Field(
        0.15, gt=0.0, description="shape of the sigmoid schedule: its width, as a fraction of the depth"
    )
    boundaries: Literal["attention"] | list[int] = Field(
        "attention", description="reduce after every attention block, or after these block indices"
    )
    """Blocks after which tokens are dropped: after every attention block, or these
    block indices."""
    selection: Literal["scores", "random"] = Field(
        "scores", description='`"random"` keeps a seeded random subset of the same size (baseline)'
    )
    """`random`: keep a seeded random subset of the same size (a baseline)."""
    score_layers: Literal["all", "attention", "mamba"] = Field(
        "all", description='which blocks score: `"all"`, `"attention"`, `"mamba"`'
    )
    """Which blocks of a stage contribute scores: attention (softmax of the query rows),
    Mamba2 (C_Q . B_V proxy), or both."""
    score_norm: Literal["zscore", "sum"] = Field(
        "zscore",
        description='how each block\'s scores are scaled before a stage sums them: `"zscore"` or `"sum"`',
    )
    """How a block's scores are put on a common scale before a stage sums them:
    `zscore` (minus the mean, over the standard deviation: every block gets the same
    say in the ranking) or `sum` (divided by their sum: a nearly flat block, such as
    softmax attention spread over a long prompt, then barely counts)."""
    mamba_decay: bool = Field(False, description="include the exp(A·Σdt) decay in the Mamba proxy (ablation)")
    """Multiply the Mamba proxy by exp(A * sum dt) (the decay the paper drops)."""
    mamba_dt: bool = Field(True, description="weight the Mamba proxy by dt")
    """Weight the Mamba proxy of token s by its step size dt_s."""
    evs_rate: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="EVS before the LLM: vLLM's EVS drops this fraction of the video tokens that changed least "
        "since the previous frame, and the prompt gets that much shorter; default: the engine's "
        "`--video-pruning-rate`. Per request only",
    )
    """vLLM's EVS for this request's videos, in the processor and the vision tower as
    in-tree (`--video-pruning-rate` is the engine-wide default): the prompt holds only the
    retained tokens, and the reduction's budget applies to them. 0 turns it off."""
    vision_micro_batch: int = Field(
        128, ge=1, description="frames or image tiles per vision-tower call (vLLM's in-tree model: 128)"
    )
    """The vision tower runs at most this many frames or tiles at once, which bounds the
    activation peak of a long video (vLLM profiles the tower at this size)."""
    modalities: list[Literal["video", "image"]] = Field(
        ["video"],
        description='which media are reduced: `["video"]`, or also `"image"` (a page or chart loses detail that '
        "a video's redundant frames do not)",
    )
    """Media whose visual tokens are scored and dropped. Images stay whole by default:
    dropping 75% of a scanned page or a chart is a different risk than of a video,
    whose neighbouring frames repeat each other."""
    reduce_question_before_media: bool = Field(
        False,
        description="also reduce a prompt whose question comes before its last image or video (the model's "
        "recipe, most OpenAI clients); its visual tokens are then scored by the chat template's tail after the "
        "media, which lost accuracy where measured (docs/measurements.md), so such prompts are served unreduced "
        "by default",
    )
    """A causal model's question rows cannot see media after them: what scores is the
    template's tail (`<|im_end|>`, the assistant prefix). Off: served unreduced, with the
    reason `question_before_media`; on: reduced, counted with `query="template_tail"`."""
    min_keep: int = Field(16, ge=1, description="never keep fewer visual tokens per request")
    """Never keep fewer visual tokens than this per request (or all, if fewer)."""
    free_dropped_kv: bool = Field(
        True,
        description="give each stage's attention layers KV-cache blocks only for the tokens they keep, so more "
        "long-video requests fit in the KV cache at once; false: blocks for the whole prompt in every layer",
    )
    """Each stage's attention layers get their own KV-cache group, sized by the scheduler
    for the rows the stage keeps (adapter/kv_stages.py). Global; V1 model runner only."""
    record_kept: bool = Field(
        False,
        description="keep the prompt positions of the visual tokens each stage kept, for the latest reduced "
        "prefills, in `reduction_state.kept`; reads them back from the device, so for inspection and tests",
    )
    timing: bool = Field(
        False,
        description="time each forward's phases (plan, metadata, scoring, selection, compaction) into "
        "`reduction_state.timings`; syncs the device per phase, so for measuring only",
    )
    """Time the phases of every forward (plan, metadata, scoring, selection, compaction)
    into the model's `reduction_state.timings`; synchronises the device per phase, so
    for measuring only. Global."""

    @field_validator("schedule")
    @classmethod
    def _ratios(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value or any(not 0.0 < r <= 1.0 for r in value):
                raise ValueError("explicit schedule ratios must be in (0, 1]")
            if any(b > a for a, b in pairwise(value)):
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
        explicit = isinstance(self.schedule, list) and isinstance(self.boundaries, list)
        if explicit and len(self.schedule) != len(self.boundaries):
            raise ValueError(f"schedule has {len(self.schedule)} ratios for {len(self.boundaries)} boundaries")
        return self

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> "ReductionConfig":
        """This config with per-request `overrides` (only PER_REQUEST_FIELDS)."""
        if not overrides:
            return self
        unknown = [_key(str(k)) for k in overrides if k not in PER_REQUEST_FIELDS]
        if unknown:
            global_only = [k for k in unknown if k in ReductionConfig.model_fields]
            names = ", ".join(f"{CONFIG_KEY}.{k}" for k in unknown[:_MAX_PROBLEMS]) + (
                ", ..." if len(unknown) > _MAX_PROBLEMS else ""
            )
            if len(global_only) == len(unknown):
                what = "cannot be set per request"
            else:
                what = "is not a per-request option" if len(unknown) == 1 else "are not per-request options"
            raise ConfigError(
                f"{names} {what} (per request: {', '.join(sorted(PER_REQUEST_FIELDS))}"
                + ("; the others globally, with --additional-config)" if global_only else ")"),
                unknown,
            )
        return parse(self.model_dump() | dict(overrides))


PER_REQUEST_FIELDS = {"enabled", "budget", "evs_rate", "reduce_question_before_media"}


def parse(raw: Mapping[str, Any] | None) -> ReductionConfig:
    """Validate `raw`; errors become one ConfigError with a short message per bad field."""
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f'{CONFIG_KEY} must be an object like {{"budget": 0.5}}, got {shown(raw)}')
    data = dict(raw or {})
    for name in _FLOAT_FIELDS:  # JSON has no float/int distinction
        if isinstance(data.get(name), int) and not isinstance(data.get(name), bool):
            data[name] = float(data[name])
    try:
        return ReductionConfig(**data)
    except ValidationError as err:
        raise _config_error(err, raw or {}) from None


def request_overrides(options: object) -> dict | None:
    """Per-request options (`mm_processor_kwargs["stateful_reduce"]`), validated;
    ConfigError as `parse`."""
    if options is None:
        return None
    if not isinstance(options, Mapping):
        raise ConfigError(f'{CONFIG_KEY} must be an object like {{"budget": 0.5}}, got {shown(options)}')
    overrides = dict(options)
    ReductionConfig().with_overrides(overrides)
    return overrides


# ---------------------------------------------------------------- error messages

_FLOAT_FIELDS = [n for n, f in ReductionConfig.model_fields.items() if f.annotation in (float, float | None)]
_LIST_ALTERNATIVE = {"schedule": "a list of per-stage keep ratios", "boundaries": "a list of block indices"}
_SHOWN_CHARS = 40
_MAX_PROBLEMS = 3


def shown(value: object, limit: int = _SHOWN_CHARS) -> str:
    """`value` as JSON (repr if not JSON), cut to `limit` characters."""
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit]
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key(key: str) -> str:
    return key if len(key) <= _SHOWN_CHARS else key[: _SHOWN_CHARS - 3] + "..."


def _join(messages: Iterable[str]) -> str:
    messages = list(messages)
    more = len(messages) - _MAX_PROBLEMS
    return "; ".join(messages[:_MAX_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")


def _range(metadata: list) -> str | None:
    """`(0, 1]`, `[0, 1)`, `> 0`, `>= 1` from a field's bounds."""
    lower = next((m for m in metadata if isinstance(m, (Gt, Ge))), None)
    upper = next((m for m in metadata if isinstance(m, (Lt, Le))), None)
    lo = None if lower is None else f"{lower.gt if isinstance(lower, Gt) else lower.ge:g}"
    hi = None if upper is None else f"{upper.lt if isinstance(upper, Lt) else upper.le:g}"
    if lo is not None and hi is not None:
        return ("(" if isinstance(lower, Gt) else "[") + f"{lo}, {hi}" + (")" if isinstance(upper, Lt) else "]")
    if lo is not None:
        return f"{'>' if isinstance(lower, Gt) else '>='} {lo}"
    if hi is not None:
        return f"{'<' if isinstance(upper, Lt) else '<='} {hi}"
    return None


def _allowed(name: str, type_error: bool) -> str:
    """What field `name` accepts, as the end of "must be ..."."""
    field = ReductionConfig.model_fields[name]
    annotation = field.annotation
    if annotation in (int | None, float | None):  # optional numbers: null means "not set"
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if annotation is bool:
        return "true or false"
    if annotation in (int, float):
        bounds = _range(field.metadata)
        kind = "an integer" if annotation is int else "a number"
        if bounds is None:
            return kind
        if bounds.startswith(("(", "[")):
            return f"{kind} in {bounds}" if type_error else f"in {bounds}"
        return f"{kind} {bounds}"
    parts = (annotation,) if get_origin(annotation) is Literal else get_args(annotation)  # Literal, list or union
    literals = [a for part in parts if get_origin(part) is Literal for a in get_args(part)]
    text = ("a list of " if get_origin(annotation) is list else "one of ") + ", ".join(json.dumps(a) for a in literals)
    return f"{text} or {_LIST_ALTERNATIVE[name]}" if name in _LIST_ALTERNATIVE else text


def _config_error(err: ValidationError, raw: Mapping[str, Any]) -> ConfigError:
    """One short message per bad field (pydantic reports one error per union branch)."""
    by_field: dict[str, list[ErrorDetails]] = {}
    whole: list[str] = []
    for e in err.errors():
        if e["loc"]:
            by_field.setdefault(str(e["loc"][0]), []).append(e)
        else:  # a model validator: the settings together
            whole.append(f"{CONFIG_KEY}: {e['msg'].removeprefix('Value error, ')}")
    messages = []
    for name, errors in by_field.items():
        if name not in ReductionConfig.model_fields:
            continue
        got = shown(raw.get(name))
        custom = next((e for e in errors if e["type"] == "value_error"), None)
        if custom is not None:  # a field validator's own words
            text = custom["msg"].removeprefix("Value error, ")
            messages.append(
                f"{CONFIG_KEY}.{text}, got {got}"
                if text.startswith(f"{name} ")
                else f"{CONFIG_KEY}.{name}: {text}, got {got}"
            )
            continue
        type_error = any(e["type"].endswith("_type") or e["type"] == "finite_number" for e in errors)
        messages.append(f"{CONFIG_KEY}.{name} must be {_allowed(name, type_error)}, got {got}")
    unknown = [_key(name) for name in by_field if name not in ReductionConfig.model_fields]
    if unknown:
        names = ", ".join(f"{CONFIG_KEY}.{n}" for n in unknown[:_MAX_PROBLEMS]) + (
            ", ..." if len(unknown) > _MAX_PROBLEMS else ""
        )
        verb = "is not an option" if len(unknown) == 1 else "are not options"
        messages.append(f"{names} {verb} (options: {', '.join(ReductionConfig.model_fields)})")
    return ConfigError(_join(messages + whole), [_key(name) for name in by_field])


def from_additional_config(additional_config: Mapping[str, Any] | None) -> ReductionConfig:
    """The global config from `vllm_config.additional_config`. EVS for every request is
    vLLM's own `--video-pruning-rate` (the processor, which shortens prompts, does not
    see this config), so `evs_rate` is refused here."""
    raw = (additional_config or {}).get(CONFIG_KEY)
    if isinstance(raw, Mapping) and "evs_rate" in raw:
        raise ConfigError(
            f"{CONFIG_KEY}.evs_rate is set per request; for every request use vLLM's --video-pruning-rate",
            ["evs_rate"],
        )
    return parse(raw)
