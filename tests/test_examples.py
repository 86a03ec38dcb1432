"""examples/ run as a user runs them, on the CPU with the small trained model, and the
README's configuration table.

Two engines: the offline batch job (a subprocess, as typed on a command line) and one
server started by examples/serve_nano_12b_gpu.sh itself (small model, CPU flags appended),
which examples/openai_client.py asks. Every answer is checked against the plain PyTorch
reference (float32, greedy) on the frames the engine decodes from the same MP4 files.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from vllm_stateful_reduce.config import ReductionConfig, parse
from vllm_stateful_reduce.testing.encoding import Encoder
from vllm_stateful_reduce.testing.launch import running_server
from vllm_stateful_reduce.testing.oracle import ReferenceNanoVL
from vllm_stateful_reduce.testing.tasks import KINDS, TEST_SEEDS, Example, make_example
from vllm_stateful_reduce.testing.video_files import read_video, write_video

from .helpers import REPO, SMALL_MODEL, random_video

EXAMPLES = REPO / "examples"
SERVE_SCRIPT = EXAMPLES / "serve_nano_12b_gpu.sh"
NUM_FRAMES = 24  # 96 visual tokens: the budgets give different keep counts (min_keep is 16)
MAX_TOKENS = 3
BATCH_BUDGET = 0.35
CPU_FLAGS = ["--dtype", "float32", "--max-model-len", "4096"]  # appended to the GPU script


def load_example(name: str):
    """An examples/ script as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> tuple[Path, dict[str, Example]]:
    """One held-out task video per question kind (MP4), and a file that is no video."""
    folder = tmp_path_factory.mktemp("videos")
    examples = {}
    for kind in KINDS:
        example = make_example(TEST_SEEDS[7], kind=kind, num_frames=NUM_FRAMES)
        examples[write_video(example.frames, folder / f"{kind}.mp4", fps=2.0).name] = example
    (folder / "broken.mp4").write_bytes(np.random.default_rng(3).bytes(2048))
    return folder, examples


@pytest.fixture(scope="module")
def reference_answers(videos):
    """answers(config) -> {video: (answer text, kept per stage)} from the reference forward
    on the decoded MP4 frames (what vLLM's OpenCV decoding gives both examples)."""
    folder, examples = videos
    encoder, reference = Encoder(SMALL_MODEL), ReferenceNanoVL(SMALL_MODEL)
    stop = set(encoder.tokenizer.convert_tokens_to_ids(["</s>", "<|im_end|>"]))
    cache: dict[str, dict] = {}

    def answers(options: dict) -> dict[str, tuple[str, list[int] | None]]:
        key = json.dumps(options, sort_keys=True)
        if key not in cache:
            cache[key] = {}
            for name, example in examples.items():
                decoded = replace(example, frames=read_video(folder / name))
                ids, pixels = encoder.prompt_ids(decoded), encoder.pixels(decoded)
                tokens, _, kept = reference.greedy(ids, [pixels], parse(options), MAX_TOKENS)
                end = next((i for i, t in enumerate(tokens) if t in stop), len(tokens))
                counts = [len(k) for k in kept]
                cache[key][name] = (encoder.tokenizer.decode(tokens[:end]).strip(), counts if len(counts) > 1 else None)
        return cache[key]

    return answers


# ------------------------------------------------------------------ offline batch job


@pytest.fixture(scope="module")
def batch_run(videos, tmp_path_factory):
    """examples/offline_batch.py over the folder (per-video questions, 2 batches)."""
    folder, examples = videos
    work = tmp_path_factory.mktemp("batch")
    questions = work / "questions.jsonl"
    names = [*examples, "broken.mp4"]
    questions.write_text(
        "".join(
            json.dumps({"video": n, "question": examples.get(n, examples["count.mp4"]).question}) + "\n" for n in names
        )
    )
    out = work / "answers.jsonl"
    command = [sys.executable, str(EXAMPLES / "offline_batch.py"), str(folder), "--questions", str(questions),
               "--budget", str(BATCH_BUDGET), "--max-tokens", str(MAX_TOKENS), "--dtype", "float32",
               "--max-model-len", "4096", "--batch-size", "3", "--out", str(out)]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    print(f"offline_batch.py: exit {done.returncode} after {time.monotonic() - started:.0f} s")
    assert done.returncode == 0, done.stderr[-3000:]
    return names, [json.loads(line) for line in out.read_text().splitlines()], done.stderr


@pytest.mark.engine
def test_batch_job_answers_every_video_like_the_reference(batch_run, videos, reference_answers) -> None:
    names, lines, stderr = batch_run
    _, examples = videos
    assert [line["video"] for line in lines] == names  # one line per video, in the questions' order
    assert "broken.mp4: not a readable video" in lines[-1]["error"] and "answer" not in lines[-1]
    expected = reference_answers({"budget": BATCH_BUDGET})
    for line in lines[:-1]:
        assert line["question"] == examples[line["video"]].question
        assert line["answer"] and line["answer"] == expected[line["video"]][0], line
        assert line["kept_visual_tokens"] == expected[line["video"]][1], line
        assert line["kept_visual_tokens"][0] == NUM_FRAMES * 4 > line["kept_visual_tokens"][-1]
        timing = line["timing"]
        assert timing["first_token_s"] >= timing["prefill_s"] > 0 and timing["decode_s"] >= 0, timing
    right = sum(line["answer"] == examples[line["video"]].answer for line in lines[:-1])
    print(
        f"batch at {BATCH_BUDGET}: {right}/{len(lines) - 1} task answers right; kept {lines[0]['kept_visual_tokens']}"
    )
    assert re.search(rf"{len(names)}/{len(names)} \[", stderr), stderr[-2000:]  # the progress bar's last state
    assert f"{len(names) - 1}/{len(names)} videos answered" in stderr


def test_batch_job_options(videos, tmp_path) -> None:
    """Argument handling without an engine: questions, the reduction switch, bad input."""
    batch = load_example("offline_batch")
    folder, examples = videos
    args = batch.parse_args(
        [str(folder), "--question", "What is shown?", "--no-reduction", "--out", str(tmp_path / "o.jsonl")]
    )
    assert [job.video for job in args.jobs] == sorted([*examples, "broken.mp4"])
    assert batch.engine_kwargs(args, args.reduction)["additional_config"] == {"stateful_reduce": {"enabled": False}}
    args = batch.parse_args([str(folder), "--question", "?", "--budget", "0.5", "--out", "o.jsonl"])
    kwargs = batch.engine_kwargs(args, args.reduction)
    assert kwargs["additional_config"] == {"stateful_reduce": {"budget": 0.5}}
    assert kwargs["enforce_eager"] and not kwargs["enable_prefix_caching"] and not kwargs["enable_chunked_prefill"]
    assert kwargs["max_num_batched_tokens"] == kwargs["max_model_len"]
    bad = tmp_path / "bad.jsonl"
    cases = {
        "budget 1.5": (["--question", "?", "--budget", "1.5"], "stateful_reduce.budget must be in (0, 1], got 1.5"),
        "budget 0.05": (["--question", "?", "--budget", "0.05"], "budget: 0.05 is below the smallest depth average"),
        "no question": ([], "one of the arguments --question --questions is required"),
        "not JSON": (["--questions", str(bad)], "line 1: not JSON", "{oops"),
        "no question field": (
            ["--questions", str(bad)],
            "line 2: needs a non-empty string 'question'",
            '{"video": "order.mp4", "question": "?"}\n{"video": "order.mp4"}',
        ),
        "unknown video": (
            ["--questions", str(bad)],
            "line 1: video 'nope.mp4' is not a file",
            '{"video": "nope.mp4", "question": "?"}',
        ),
        "max tokens 0": (["--question", "?", "--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
    }
    for case, (argv, message, *content) in cases.items():
        if content:
            bad.write_text(content[0])
        completed = subprocess.run(
            [sys.executable, str(EXAMPLES / "offline_batch.py"), str(folder), *argv, "--out", "x"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert completed.returncode == 2 and message in completed.stderr, (case, completed.stderr[-500:])


def test_batch_job_samples_frames_like_vllms_loader(tmp_path) -> None:
    """Uniform sampling over all frames (vLLM's served-video rule), frames as OpenCV decodes them."""
    batch = load_example("offline_batch")
    path = write_video(random_video(40, seed=5), tmp_path / "long.mp4", fps=4.0)
    frames, metadata = batch.load_video(path, num_frames=8)
    expected = np.linspace(0, 39, 8, dtype=int).tolist()
    assert metadata["frames_indices"] == expected and metadata["fps"] == 4.0 and metadata["total_num_frames"] == 40
    np.testing.assert_array_equal(frames, read_video(path)[expected])
    all_frames, metadata = batch.load_video(path, num_frames=64)
    assert metadata["frames_indices"] == list(range(40)) and all_frames.shape[0] == 40


# ------------------------------------------------------- server script + OpenAI client


@pytest.fixture(scope="module")
def server(videos, tmp_path_factory):
    """examples/serve_nano_12b_gpu.sh with the small model, its flags as written, CPU flags appended."""
    folder, _ = videos
    log = tmp_path_factory.mktemp("serve") / "serve.log"

    def command(port: int) -> list[str]:
        env = [f"MODEL={SMALL_MODEL}", f"VIDEO_DIR={folder}", f"VLLM={sys.executable} -m vllm_stateful_reduce",
               "HOST=127.0.0.1", f"PORT={port}"]  # fmt: skip
        return ["env", *env, "bash", str(SERVE_SCRIPT), *CPU_FLAGS]

    with running_server(SMALL_MODEL, log_path=log, command=command) as url:
        yield url, log


def run_client(server_url: str, videos: list[Path], question: str, *options: str) -> list[dict]:
    command = [sys.executable, str(EXAMPLES / "openai_client.py"), *map(str, videos), "--question", question,
               "--base-url", server_url + "/v1", "--max-tokens", str(MAX_TOKENS), *options]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def client_answers(server_url: str, videos, *options: str) -> dict[str, str]:
    """{video: answer}, one client run per question (the client takes one question)."""
    folder, examples = videos
    answers = {}
    for question in sorted({e.question for e in examples.values()}):
        names = [n for n, e in examples.items() if e.question == question]
        for name, line in zip(
            names, run_client(server_url, [folder / n for n in names], question, *options), strict=True
        ):
            assert line["video"] == str(folder / name) and line["prompt_tokens"] > NUM_FRAMES * 4
            answers[name] = line["answer"]
    return answers


@pytest.mark.engine
def test_client_default_budget_off_switch_and_per_request_budget(server, videos, reference_answers, batch_run) -> None:
    url, _ = server
    answers = {
        "server default (25%)": (client_answers(url, videos), {}),
        "--no-reduction": (client_answers(url, videos, "--no-reduction"), {"enabled": False}),
        f"--budget {BATCH_BUDGET}": (
            client_answers(url, videos, "--budget", str(BATCH_BUDGET)),
            {"budget": BATCH_BUDGET},
        ),
        f"--budget {BATCH_BUDGET} --by-path": (
            client_answers(url, videos, "--budget", str(BATCH_BUDGET), "--by-path"),
            {"budget": BATCH_BUDGET},
        ),
    }
    for mode, (got, options) in answers.items():
        expected = {name: answer for name, (answer, _) in reference_answers(options).items()}
        print(f"{mode}: {got}")
        assert got == expected, mode
    # the same per-request budget through the server as the batch job's global one offline
    _, lines, _ = batch_run
    assert answers[f"--budget {BATCH_BUDGET}"][0] == {line["video"]: line["answer"] for line in lines[:-1]}


@pytest.mark.engine
def test_client_per_request_option_reaches_the_model(server, videos) -> None:
    """A budget the 13-block model cannot reach is served unreduced and logged: the option
    got through `extra_body` to the model (a valid one changes no answer of this robust model)."""
    url, log = server
    folder, examples = videos
    line = run_client(url, [folder / "order.mp4"], examples["order.mp4"].question, "--budget", "0.05")[0]
    assert line["answer"] and line["options"] == {"budget": 0.05} and line["sent_as"] == "base64"
    deadline = time.monotonic() + 10
    while "served unreduced: infeasible: budget: 0.05" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "served unreduced: infeasible: budget: 0.05" in log.read_text()


@pytest.mark.engine
def test_client_reports_a_refused_request(server, videos) -> None:
    url, _ = server
    folder, examples = videos
    command = [sys.executable, str(EXAMPLES / "openai_client.py"), str(folder / "order.mp4"), "--question", "?",
               "--base-url", url + "/v1", "--budget", "1.5"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "stateful_reduce.budget must be in (0, 1], got 1.5" in done.stderr, done.stderr
    outside = subprocess.run(
        [*command[:2], "/etc/hostname", *command[3:-2], "--by-path"], capture_output=True, text=True, timeout=120
    )
    assert outside.returncode == 1 and "--allowed-local-media-path" in outside.stderr, outside.stderr


@pytest.mark.engine
def test_server_started_with_the_scripts_settings(server) -> None:
    _, log = server
    text = log.read_text()
    assert "--plugin stateful-reduce: architecture NemotronH_Nano_VL_V2_StatefulReduce" in text
    assert "token reduction on: enabled=True budget=0.25 budget_mode=depth_average" in text  # from the YAML


# ------------------------------------------------------------ script and config file


def serve_script_argv(tmp_path: Path, **env: str) -> tuple[int, list[str], str]:
    """The argv the script hands to `vllm` (a stand-in that records it), and its exit code."""
    record = tmp_path / "argv.json"
    fake = tmp_path / "fake-vllm"
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'plugins': os.environ.get('VLLM_PLUGINS')}}, open({str(record)!r}, 'w'))\n"
    )
    fake.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in ("MODEL", "VIDEO_DIR", "VLLM_PLUGINS")}
    done = subprocess.run(
        ["bash", str(SERVE_SCRIPT)], env={**clean, "VLLM": str(fake), **env}, capture_output=True, text=True, timeout=60
    )
    recorded = json.loads(record.read_text()) if record.exists() else {"argv": [], "plugins": None}
    return done.returncode, recorded["argv"], (recorded["plugins"] or "") + done.stderr


def test_serve_script_flags_are_what_vllm_serve_parses(tmp_path) -> None:
    """Not run on a GPU here: its flags, with the 12B default, through `vllm serve`'s own parser."""
    import vllm
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    assert subprocess.run(["bash", "-n", str(SERVE_SCRIPT)]).returncode == 0
    code, argv, plugins = serve_script_argv(tmp_path, VIDEO_DIR=str(tmp_path))
    assert (
        code == 0
        and argv[:2] == ["serve", "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16"]
        and plugins == "stateful_reduce"
    )
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv[1:])  # expands --config
    assert args.model_tag == "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16" and args.plugin == "stateful-reduce"
    defaults = yaml.safe_load((EXAMPLES / "reduction_config.yaml").read_text())["additional-config"]
    assert args.additional_config == defaults
    assert args.trust_request_mm_kwargs and args.allowed_local_media_path == str(tmp_path)
    assert args.media_io_kwargs == {"video": {"num_frames": 128}} and args.limit_mm_per_prompt == {"video": 1}
    assert args.dtype == "bfloat16" and args.max_model_len == 40960
    args.model = args.model_tag
    assert getattr(vllm.AsyncEngineArgs.from_cli_args(args), "_stateful_reduce_plugin", False)  # the flag acts
    code, _, stderr = serve_script_argv(tmp_path, VIDEO_DIR=str(tmp_path / "missing"))
    assert code == 2 and "is not a directory" in stderr
    code, argv, _ = serve_script_argv(tmp_path)
    assert code == 0 and "--allowed-local-media-path" not in argv  # data URLs only


def test_reduction_config_file_shows_every_option_at_its_default() -> None:
    text = (EXAMPLES / "reduction_config.yaml").read_text()
    settings = yaml.safe_load(text)["additional-config"]["stateful_reduce"]
    per_request_only = {"evs_rate"}  # refused globally: --video-pruning-rate is vLLM's own
    assert list(settings) == [f for f in ReductionConfig.model_fields if f not in per_request_only]
    assert parse(settings) == ReductionConfig()
    assert settings == ReductionConfig().model_dump(exclude=per_request_only)
    lines = text.splitlines()
    for name in settings:  # each option with a comment right above it
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:"))
        assert lines[at - 1].strip().startswith("#"), name


def test_readme_configuration_table_is_generated_from_the_model() -> None:
    spec = importlib.util.spec_from_file_location("config_table", REPO / "scripts" / "config_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    rendered = table.render()
    assert table.readme_table((REPO / "README.md").read_text()) == rendered, (
        "run python scripts/config_table.py --write"
    )
    rows = rendered.splitlines()[2:]
    assert [re.match(r"\| `(\w+)` ", row).group(1) for row in rows] == list(ReductionConfig.model_fields)
    assert table.with_table(f"a\n{table.BEGIN}\nold\n{table.END}\nb", "new") == f"a\n{table.BEGIN}\nnew\n{table.END}\nb"
