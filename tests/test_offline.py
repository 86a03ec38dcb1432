"""Offline `LLM.generate` through the plugin with reduction off, one engine for the module
(float32): the foundation's oracles."""

import importlib.metadata
import os

import numpy as np
import pytest
import torch
from vllm import LLM, SamplingParams

from vllm_stateful_reduce.model.hf_config import NemotronNanoVLConfig
from vllm_stateful_reduce.model.processing import frames_to_pixel_values
from vllm_stateful_reduce.testing.checkpoint import export_language_model

from .helpers import chat_prompt, engine_kwargs, random_video, shutdown, video_metadata

pytestmark = pytest.mark.engine  # starts a vLLM engine or server


@pytest.fixture(scope="module")
def llm(checkpoint):
    llm = LLM(**engine_kwargs(checkpoint, additional_config={"stateful_reduce": {"enabled": False}}))
    yield llm
    shutdown(llm)


def video_request(question: str, *videos: np.ndarray) -> dict:
    prompt = chat_prompt(question).replace("<video>", "<video>" * len(videos))
    data = [(v, video_metadata(len(v))) for v in videos]
    return {"prompt": prompt, "multi_modal_data": {"video": data if len(data) > 1 else data[0]}}


def _worker_probe(worker) -> dict:
    """Runs inside vLLM's worker process."""
    import os

    import vllm_stateful_reduce

    return {
        "pid": os.getpid(),
        "registered": vllm_stateful_reduce._registered,
        "model": type(worker.model_runner.model).__name__,
    }


def _plugin_on_the_runner(worker) -> dict:
    """Runs inside vLLM's worker process: whether the plugin's runner wrappers are there."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    import vllm_stateful_reduce
    from vllm_stateful_reduce.adapter.patching import is_installed

    return {
        "registered": vllm_stateful_reduce._registered,
        "runner_wrapped": is_installed(GPUModelRunner._model_forward)
        or is_installed(GPUModelRunner.initialize_metadata_builders),
        "model": type(worker.model_runner.model).__module__,
    }


def test_entry_point_is_discovered_in_engine_processes(llm) -> None:
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert names.get("stateful_reduce") == "vllm_stateful_reduce:register"
    probes = llm.collective_rpc(_worker_probe)
    assert probes and all(p["pid"] != os.getpid() for p in probes), probes
    assert all(p["registered"] and p["model"] == "NemotronNanoVLStatefulReduce" for p in probes), probes


def test_batch_of_videos_with_different_lengths(llm, checkpoint) -> None:
    tokens_per_frame = NemotronNanoVLConfig.from_pretrained(checkpoint).tokens_per_frame
    frame_counts = [1, 4, 9]
    requests = [video_request("What is in the video?", random_video(n, seed=n)) for n in frame_counts]
    requests.append(video_request("Compare the two videos.", random_video(2, seed=20), random_video(3, seed=30)))
    requests.append({"prompt": chat_prompt("Hello there.", with_video=False)})
    outputs = llm.generate(requests, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    context_id = llm.get_tokenizer().convert_tokens_to_ids("<image>")
    for out, frames in zip(outputs, frame_counts + [5, 0], strict=True):
        assert out.prompt_token_ids.count(context_id) == frames * tokens_per_frame
        assert len(out.outputs[0].token_ids) == 12 and out.outputs[0].text.strip()


def test_video_prompt_logprobs_match_reference(llm, reference, checkpoint) -> None:
    """vLLM's whole path (processor, RADIO, projector, NemotronH) vs the plain PyTorch one."""
    config = NemotronNanoVLConfig.from_pretrained(checkpoint)
    video = random_video(3, seed=7)
    out = llm.generate(
        [video_request("Which frame is brightest?", video)],
        SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=5),
    )[0]
    ids = out.prompt_token_ids
    pixels = frames_to_pixel_values(video, config.force_image_size, config.norm_mean, config.norm_std)
    ref = torch.log_softmax(reference.logits(ids, [pixels]).double(), -1)
    blind = torch.log_softmax(reference.logits(ids, [torch.zeros_like(pixels)]).double(), -1)
    diffs, video_effect = [], []
    for pos in range(1, len(ids)):
        for token_id, lp in out.prompt_logprobs[pos].items():
            diffs.append(abs(lp.logprob - ref[pos - 1, token_id].item()))
            video_effect.append(abs(blind[pos - 1, token_id].item() - ref[pos - 1, token_id].item()))
    print(
        f"video prompt: {len(diffs)} logprobs, max |delta| vs reference {max(diffs):.2e}; "
        f"max effect of the video itself {max(video_effect):.2e}"
    )
    assert max(video_effect) > 1e-2  # the comparison can see a wrong vision path
    assert max(diffs) < 1e-5  # measured 7.9e-7


def prompt_logprob_table(llm: LLM, prompts: list[list[int]]) -> list[list[dict[int, float]]]:
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=5)
    )
    return [[{t: lp.logprob for t, lp in pos.items()} for pos in out.prompt_logprobs[1:]] for out in outs]


def test_text_logprobs_match_transformers_and_in_tree_nemotron_h(llm, reference, checkpoint, tmp_path) -> None:
    """Reduction off, text only: the plugin's language model against two other implementations.
    The in-tree model runs with the plugin loaded, and none of the plugin's code on its path."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(9, 512, n).tolist() for n in (300, 173, 64)]
    our_table = prompt_logprob_table(llm, prompts)
    in_tree_llm = LLM(**engine_kwargs(export_language_model(checkpoint, tmp_path / "lm"), limit_mm_per_prompt=None))
    try:
        # the plugin is loaded there, and none of its code is on the in-tree model's path
        (probe,) = in_tree_llm.collective_rpc(_plugin_on_the_runner)
        assert probe == {"registered": True, "runner_wrapped": False, "model": "vllm.model_executor.models.nemotron_h"}
        (ours,) = llm.collective_rpc(_plugin_on_the_runner)
        assert ours["runner_wrapped"]  # the plugin's model installed them in its own engine
        in_tree = prompt_logprob_table(in_tree_llm, prompts)
    finally:
        shutdown(in_tree_llm)
    vs_hf, vs_in_tree = [], []
    for prompt, our_rows, tree_rows in zip(prompts, our_table, in_tree, strict=True):
        hf = torch.log_softmax(reference.lm(torch.tensor([prompt])).logits[0].double(), -1)
        for pos, (row, tree_row) in enumerate(zip(our_rows, tree_rows, strict=True)):
            assert row.keys() == tree_row.keys()
            vs_hf += [abs(lp - hf[pos, t].item()) for t, lp in row.items()]
            vs_in_tree += [abs(lp - tree_row[t]) for t, lp in row.items()]
    print(
        f"text: {len(vs_hf)} prompt logprobs; max |delta| vs transformers {max(vs_hf):.2e}, "
        f"vs in-tree NemotronHForCausalLM {max(vs_in_tree):.2e}"
    )
    assert max(vs_hf) < 2e-5  # measured 3.0e-6
    assert max(vs_in_tree) < 1e-6  # measured 0 (same kernels, same weights)
