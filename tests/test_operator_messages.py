"""What an operator reads: the messages invalid reduction options get, and the plugin's
log routing and rate limit (no engine; the server-side view is in test_server.py)."""

import json
import logging

import pytest
from vllm.engine.arg_utils import EngineArgs

from vllm_stateful_reduce import log
from vllm_stateful_reduce.adapter.request_checks import RequestError, check_request_options
from vllm_stateful_reduce.config import ConfigError, parse, request_overrides

from .helpers import engine_kwargs


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"budget": 1.5}, "stateful_reduce.budget must be in (0, 1], got 1.5"),
        ({"budget": "abc"}, 'stateful_reduce.budget must be a number in (0, 1], got "abc"'),
        ({"budget": None}, "stateful_reduce.budget must be a number in (0, 1], got null"),
        ({"budget": float("nan")}, "stateful_reduce.budget must be a number in (0, 1], got NaN"),
        ({"evs_rate": 1.0}, "stateful_reduce.evs_rate must be in [0, 1), got 1.0"),
        ({"modalities": ["audio"]}, 'stateful_reduce.modalities must be a list of "video", "image", got ["audio"]'),
        ({"min_keep": 0}, "stateful_reduce.min_keep must be an integer >= 1, got 0"),
        ({"sigmoid_temperature": 0}, "stateful_reduce.sigmoid_temperature must be a number > 0, got 0"),
        ({"enabled": "yes"}, 'stateful_reduce.enabled must be true or false, got "yes"'),
        ({"score_norm": "max"}, 'stateful_reduce.score_norm must be one of "zscore", "sum", got "max"'),
        (
            {"schedule": 3},
            'stateful_reduce.schedule must be one of "sigmoid", "step", "geometric" or a list of per-stage keep '
            "ratios, got 3",
        ),
        (
            {"boundaries": [5, 2]},
            "stateful_reduce.boundaries must be distinct, increasing, non-negative block indices, got [5, 2]",
        ),
        ({"budgt": 0.3}, "stateful_reduce.budgt is not an option (options: enabled, budget,"),
        ({"schedule": [0.5, 0.2], "boundaries": [3]}, "stateful_reduce: schedule has 2 ratios for 1 boundaries"),
        ([0.5], 'stateful_reduce must be an object like {"budget": 0.5}, got [0.5]'),
    ],
)
def test_global_config_errors_say_field_allowed_and_received(raw, message) -> None:
    with pytest.raises(ConfigError) as err:
        parse(raw)
    assert str(err.value).startswith(message), str(err.value)


def test_global_evs_rate_points_at_vllms_flag() -> None:
    """EVS for every request is vLLM's --video-pruning-rate (the processor applies it)."""
    from vllm_stateful_reduce.config import from_additional_config

    with pytest.raises(ConfigError, match="for every request use vLLM's --video-pruning-rate"):
        from_additional_config({"stateful_reduce": {"evs_rate": 0.5}})


def test_received_values_and_names_are_truncated() -> None:
    huge = "x" * 1_000_000
    for bad in ({"budget": huge}, {"budget": list(range(100_000))}, {huge: 1}, {f"k{i}": 1 for i in range(1000)}):
        with pytest.raises(ConfigError) as err:
            request_overrides(bad)
        assert len(str(err.value)) < 300, str(err.value)[:400]


def test_request_errors_are_vllm_400s_and_value_errors() -> None:
    with pytest.raises(RequestError) as err:
        check_request_options({"evs_rate": -0.2})
    assert isinstance(err.value, ValueError)  # offline callers: a ValueError
    assert str(err.value) == "stateful_reduce.evs_rate must be in [0, 1), got -0.2"
    assert err.value.parameter == "mm_processor_kwargs.stateful_reduce.evs_rate"
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    body = create_error_response(err.value)  # what the API server sends
    assert body.error.code == 400 and body.error.message == str(err.value)
    assert len(json.dumps(body.model_dump())) < 300


@pytest.mark.engine
def test_server_default_options_are_checked_at_start_up(checkpoint) -> None:
    kwargs = engine_kwargs(checkpoint, mm_processor_kwargs={"stateful_reduce": {"budget": 0}})
    kwargs.pop("seed")
    with pytest.raises(ValueError, match=r"stateful_reduce\.budget must be in \(0, 1\], got 0"):
        EngineArgs(**kwargs).create_engine_config()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_unreduced_lines_are_rate_limited_per_reason() -> None:
    clock = FakeClock()
    limit = log.ReasonRateLimit(interval=60.0, clock=clock)
    assert limit.passes("no_text_after_video") == 0
    assert limit.passes("no_text_after_video") is None
    assert limit.passes("infeasible") == 0  # another reason
    assert limit.passes("infeasible") is None
    clock.now += 30
    assert limit.passes("no_text_after_video") is None
    clock.now += 31
    assert limit.passes("no_text_after_video") == 2  # the two held back since
    assert limit.passes("no_text_after_video") is None


def test_plugin_loggers_hang_under_vllm() -> None:
    log.route_to_vllm()
    log.route_to_vllm()  # idempotent
    ancestors, logger = [], logging.getLogger("vllm_stateful_reduce.model.nano_vl")
    while logger.parent is not None:
        ancestors.append(logger := logger.parent)
    assert logging.getLogger("vllm_stateful_reduce") in ancestors and logging.getLogger("vllm") in ancestors
