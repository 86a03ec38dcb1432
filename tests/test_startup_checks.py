"""Engine settings a reduced prefill cannot live with are refused at start-up, by flag name."""

import pytest
from vllm.engine.arg_utils import EngineArgs

from .helpers import engine_kwargs

pytestmark = pytest.mark.engine  # starts a vLLM engine or server


def make_config(checkpoint, **overrides):
    kwargs = engine_kwargs(checkpoint, **overrides)
    kwargs.pop("seed")
    return EngineArgs(**kwargs).create_engine_config()


def test_required_settings_are_accepted_and_state_is_float32(checkpoint) -> None:
    config = make_config(checkpoint)
    # the in-tree Nano VL hook's settings, applied to the plugin architecture too
    assert config.cache_config.mamba_ssm_cache_dtype == "float32"
    assert config.model_config.multimodal_config.media_io_kwargs["video"]["video_backend"] == "nemotron_vl"


@pytest.mark.parametrize(
    "overrides,flag",
    [
        ({"enable_prefix_caching": True}, "--no-enable-prefix-caching"),
        ({"enable_chunked_prefill": True}, "--no-enable-chunked-prefill"),
        ({"max_num_batched_tokens": 1024}, "max_num_batched_tokens"),  # vLLM's own check
        ({"enforce_eager": False}, "--enforce-eager"),
    ],
)
def test_refuses_settings_that_split_or_compile_a_prompt(checkpoint, overrides, flag) -> None:
    with pytest.raises(ValueError, match=flag):
        make_config(checkpoint, **overrides)


def test_refuses_what_freeing_dropped_kv_cannot_serve(checkpoint) -> None:
    """KV connectors would move blocks whose rows the connector does not know are
    compacted; a user's scheduler class would lose the plugin's block sizing."""
    connector = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both"}
    with pytest.raises(ValueError, match="--kv-transfer-config"):
        make_config(checkpoint, kv_transfer_config=connector)
    with pytest.raises(ValueError, match="--scheduler-cls"):
        make_config(checkpoint, scheduler_cls="vllm.v1.core.sched.scheduler.Scheduler")
    config = make_config(
        checkpoint,
        scheduler_cls="vllm.v1.core.sched.scheduler.Scheduler",
        additional_config={"stateful_reduce": {"free_dropped_kv": False}},
    )
    assert config.scheduler_config.scheduler_cls == "vllm.v1.core.sched.scheduler.Scheduler"
    assert make_config(checkpoint).scheduler_config.scheduler_cls.endswith("kv_stages.stage_scheduler")


@pytest.mark.parametrize(
    "reduction,field",
    [
        ({"budget": 1.5}, "budget"),
        ({"schedule": "cosine"}, "schedule"),
        ({"budget": 0.05}, "budget"),
        ({"bugdet": 0.3}, "bugdet"),
    ],
)
def test_refuses_bad_reduction_config_by_field(checkpoint, reduction, field) -> None:
    """Invalid or (for this block layout) unreachable settings fail before any process starts."""
    with pytest.raises(ValueError, match=field):
        make_config(checkpoint, additional_config={"stateful_reduce": reduction})
