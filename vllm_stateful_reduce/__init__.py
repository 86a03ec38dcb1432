"""vLLM plugin: stateful, query-conditioned token reduction for long-video hybrid VLMs.

vLLM calls `register()` (entry point group `vllm.general_plugins`, name
`stateful_reduce`) in every process it starts: front end, engine core, workers.
"""

import os

from .adapter.config_hook import REQUIRED_ENGINE_ARGS, hf_overrides

__all__ = ["ARCHITECTURE", "HF_OVERRIDES", "REQUIRED_ENGINE_ARGS", "register"]

ARCHITECTURE = "NemotronH_Nano_VL_V2_StatefulReduce"
# `hf_overrides=` of `LLM(...)` (`--hf-overrides` of `vllm serve`) that selects the plugin's
# model and its config class (also under --trust-remote-code)
HF_OVERRIDES = hf_overrides(ARCHITECTURE)

_registered = False


def register() -> None:
    """Register the architecture (a lazy import: its module loads only where vLLM serves
    it), its HF config class and config hook, the `--plugin stateful-reduce` flag of
    `vllm serve`, and the plugin's logging under vLLM's. Idempotent.

    Everything else acts only where the plugin's model is configured or built: the
    config hook installs the front end's check of per-request options, the model the
    runner glue (`adapter/`)."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    from . import log
    from .adapter.cli import install_plugin_flag
    from .adapter.config_hook import SERVING_ENV, install_config_hook, register_hf_config, register_source_model_type
    from .model.hf_config import NemotronNanoVLConfig, NemotronNanoVLSourceConfig
    from .model.tokens import prompt_markers

    log.route_to_vllm()
    register_hf_config(ARCHITECTURE, NemotronNanoVLConfig)
    install_config_hook(ARCHITECTURE, NemotronNanoVLSourceConfig, prompt_markers)
    if os.environ.get(SERVING_ENV):  # started by a process that configured the plugin's model
        from .adapter.kv_stages import serve_stages

        register_source_model_type(NemotronNanoVLSourceConfig)
        serve_stages(prompt_markers)
    install_plugin_flag()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "vllm_stateful_reduce.model.nano_vl:NemotronNanoVLStatefulReduce")
    _registered = True
