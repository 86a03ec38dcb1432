"""The plugin's boundary with vLLM: vLLM internals are reached from `adapter/` only, and
the adapter never imports the model modules back (no import circle).

Outside the adapter the package may import from vLLM what an in-tree model imports
(the model-building API: `vllm.model_executor`, `vllm.multimodal`, `vllm.config`, ...),
and never a name vLLM marks private (a leading underscore). Parsed from the source, so a
lazy import inside a function counts too.
"""

import ast
import os
from pathlib import Path

import pytest

import vllm_stateful_reduce

PACKAGE = Path(vllm_stateful_reduce.__file__).parent
ADAPTER = PACKAGE / "adapter"
# what vLLM's own in-tree models import
MODEL_API = (
    "vllm.config",
    "vllm.logger",
    "vllm.distributed",
    "vllm.model_executor",
    "vllm.multimodal",
    "vllm.compilation.decorators",
    "vllm.sequence",
    "vllm.tokenizers",
    "vllm.transformers_utils.configs",
    "vllm.utils",
)


def vllm_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every `vllm` import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "vllm":
            found.append((node.lineno, node.module or "", [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "vllm"]
    return found


def relative_imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every relative import in a package file."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out += [(node.lineno, module)] if node.module else [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return out


def test_vllm_internals_are_reached_from_the_adapter_only() -> None:
    problems = []
    files = [p for p in PACKAGE.rglob("*.py") if ADAPTER not in p.parents]
    for path in files:
        for line, module, names in vllm_imports(path):
            where = f"{path.relative_to(PACKAGE)}:{line}"
            private = [n for n in [*module.split("."), *names] if n.startswith("_")]
            if private:
                problems.append(f"{where}: private vLLM name {private} from {module}")
            elif module != "vllm" and not module.startswith(MODEL_API):
                problems.append(f"{where}: {module} is not the model API; reach it through adapter/")
    assert len(files) > 20  # the walk saw the package
    assert not problems, "\n".join(problems)


def test_the_adapter_does_not_import_the_model_modules() -> None:
    circles = [
        f"{path.relative_to(PACKAGE)}:{line}: {module}"
        for path in ADAPTER.glob("*.py")
        for line, module in relative_imports(path)
        if module.startswith("vllm_stateful_reduce.model")
    ]
    assert len(list(ADAPTER.glob("*.py"))) >= 8
    assert not circles, "\n".join(circles)


FRONT_END_PROBE = """
import json, sys
from vllm.engine.arg_utils import EngineArgs
from vllm.renderers import online_renderer
from vllm.renderers.base import BaseRenderer
from vllm_stateful_reduce import HF_OVERRIDES, REQUIRED_ENGINE_ARGS
from vllm_stateful_reduce.adapter.patching import is_installed

from transformers.models.auto.configuration_auto import CONFIG_MAPPING

def patched():
    checks = is_installed(online_renderer.validate_request_mm_kwargs) or is_installed(BaseRenderer._process_tokens)
    return {"request_checks": checks, "autoconfig": "NemotronH_Nano_VL_V2" in CONFIG_MAPPING}

seen = {}
EngineArgs(model=sys.argv[1], max_model_len=2048).create_engine_config()  # vLLM's in-tree NemotronH
seen["in_tree"] = patched()
ours = EngineArgs(model=sys.argv[2], hf_overrides=HF_OVERRIDES, max_model_len=2048, **REQUIRED_ENGINE_ARGS)
ours.create_engine_config()
seen["ours"] = patched()
print(json.dumps(seen))
"""


def test_front_end_checks_are_installed_only_for_the_plugins_model(checkpoint, tmp_path) -> None:
    """A front end configured for another model (vLLM's in-tree NemotronH), the plugin
    loaded, has none of the plugin's request checks and transformers' AutoConfig does not
    know the Nano VL model_type; configuring the plugin's model installs both. (The worker
    side: tests/test_offline.py.) A fresh process: nothing installed yet."""
    import json
    import subprocess
    import sys

    from vllm_stateful_reduce.adapter.config_hook import SERVING_ENV
    from vllm_stateful_reduce.testing.checkpoint import export_language_model

    in_tree = export_language_model(checkpoint, tmp_path / "lm")
    env = {k: v for k, v in os.environ.items() if k != SERVING_ENV}  # as an operator starts it, not from a test
    run = subprocess.run(
        [sys.executable, "-c", FRONT_END_PROBE, str(in_tree), str(checkpoint)], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen == {
        "in_tree": {"request_checks": False, "autoconfig": False},
        "ours": {"request_checks": True, "autoconfig": True},
    }


def test_console_scripts_resolve() -> None:
    """Every console script pyproject.toml declares points at a callable that exists (a
    moved module would leave `vllm-stateful-reduce serve`, the docker entry point, broken)."""
    import importlib

    import tomllib

    scripts = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert "vllm-stateful-reduce" in scripts
    for name, target in scripts.items():
        module, _, attribute = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attribute)), name


def test_mamba_tap_refuses_a_vllm_that_splits_elsewhere(monkeypatch) -> None:
    """The Mamba2 tap reads B and C where vLLM 0.32's scan splits them. A doctored vLLM
    whose forward never calls the mixer's split function (or splits other rows) makes it
    raise, naming the layer and the vLLM version - never a silent wrong score."""
    from types import SimpleNamespace

    import torch
    from vllm import forward_context

    from vllm_stateful_reduce.adapter.mixer_taps import run_with_projection

    rows, width = 5, 12
    meta = SimpleNamespace(num_prefills=1, num_prefill_tokens=rows, num_decode_tokens=0)
    monkeypatch.setattr(forward_context, "get_forward_context", lambda: SimpleNamespace(attn_metadata={"m0": meta}))

    class Mixer(torch.nn.Module):
        prefix = "m0"

        def __init__(self) -> None:
            super().__init__()
            self.in_proj = torch.nn.Linear(4, width)
            self.split_hidden_states_B_C_fn = lambda x: torch.split(x, [4, 4, 4], dim=-1)

    mixer, x = Mixer(), torch.randn(rows, 4)

    def vllm_0_32() -> torch.Tensor:  # in_proj, then the scan's split of the prefill rows
        projected = mixer.in_proj(x)
        mixer.split_hidden_states_B_C_fn(projected)
        return projected

    _, seen = run_with_projection(mixer, vllm_0_32)
    assert seen.b.shape == (rows, 4) and torch.equal(seen.projected, mixer.in_proj(x))
    doctored = [lambda: mixer.in_proj(x), lambda: mixer.split_hidden_states_B_C_fn(mixer.in_proj(x)[:2])]
    for forward in doctored:
        with pytest.raises(RuntimeError, match="m0: the scan's B and C .* vLLM 0.32"):
            run_with_projection(mixer, forward)
