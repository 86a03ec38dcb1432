"""Tensor parallel 2 (one CPU core per rank): every rank keeps the same tokens.

Each rank scores with its slice of attention heads and Mamba groups; the partial
scores are all-reduced before top-k. The result must equal the single-process
reference: same kept positions, same greedy tokens.
"""

import os

import pytest
from vllm import LLM, SamplingParams

from vllm_stateful_reduce.config import parse
from vllm_stateful_reduce.model.hf_config import NemotronNanoVLConfig
from vllm_stateful_reduce.model.processing import frames_to_pixel_values
from vllm_stateful_reduce.testing.oracle import ReferenceNanoVL

from .helpers import chat_prompt, engine_kwargs, random_video, shutdown, video_metadata

pytestmark = pytest.mark.engine  # starts a vLLM engine or server

GLOBAL = {"min_keep": 4, "score_norm": "sum", "record_kept": True}  # the default (zscore) is covered by test_reduction


@pytest.fixture(scope="module")
def llm(checkpoint):
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # one core per rank on this 2-core machine
    try:
        llm = LLM(**engine_kwargs(checkpoint, tensor_parallel_size=2, additional_config={"stateful_reduce": GLOBAL}))
    finally:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND")
    yield llm
    shutdown(llm)


def test_tp2_keeps_the_same_tokens_on_every_rank_as_the_reference(llm, checkpoint) -> None:
    video = random_video(20, seed=21)
    prompt = {"prompt": chat_prompt("Count the squares."), "multi_modal_data": {"video": (video, video_metadata(20))}}
    out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    per_rank = llm.collective_rpc(lambda w: dict(w.model_runner.model.reduction_state.kept))
    kept = [next(v for k, v in rank.items() if k.split("-")[0] == out.request_id) for rank in per_rank]
    assert len(kept) == 2 and kept[0] == kept[1]
    hf = NemotronNanoVLConfig.from_pretrained(checkpoint)
    pixels = frames_to_pixel_values(video, hf.force_image_size, hf.norm_mean, hf.norm_std)
    tokens, _, ref_kept = ReferenceNanoVL(checkpoint).greedy(out.prompt_token_ids, [pixels], parse(GLOBAL), 8)
    assert kept[0] == [k.tolist() for k in ref_kept]
    assert list(out.outputs[0].token_ids) == tokens
