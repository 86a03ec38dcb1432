"""vLLM plugin: stateful, query-conditioned token reduction for long-video hybrid VLMs.

vLLM calls `register()` (entry point group `vllm.general_plugins`, name
`stateful_reduce`) in every process it starts: front end, engine core, workers.
"""

from .vllm_compat import REQUIRED_ENGINE_ARGS, hf_overrides

__all__ = ["ARCHITECTURE", "HF_OVERRIDES", "REQUIRED_ENGINE_ARGS", "register"]

ARCHITECTURE = "NemotronH_Nano_VL_V2_StatefulReduce"
# `hf_overrides=` of `LLM(...)` (`--hf-overrides` of `vllm serve`) that selects the plugin's
# model and its config class (also under --trust-remote-code)
HF_OVERRIDES = hf_overrides(ARCHITECTURE)

_registered = False


def register() -> None:
    """Register the architecture, its config hook, the HF config class, the runner
    glue that tells the model who is in the batch, the front end's check of per-request
    options, the `--plugin stateful-reduce` flag of `vllm serve`, and the plugin's
    logging under vLLM's. Idempotent."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    from . import log
    from .vllm_compat import (
        install_config_hook,
        install_plugin_flag,
        install_request_option_check,
        install_runner_glue,
        register_hf_config,
    )

    log.route_to_vllm()
    register_hf_config(ARCHITECTURE)
    install_config_hook(ARCHITECTURE)
    install_runner_glue()
    install_request_option_check()
    install_plugin_flag()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "vllm_stateful_reduce.model.nano_vl:NemotronNanoVLStatefulReduce")
    _registered = True
