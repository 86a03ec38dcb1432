"""Preemption (recompute) of reduced requests lands in the same state.

A KV cache too small for the batch forces vLLM to preempt running requests and later
recompute their prompt + output as one prefill. The reduction must then pick the same
tokens (the query ends at the original prompt) and decode on to the same output as
the request served alone.
"""

import pytest
from vllm import LLM, SamplingParams

from .helpers import chat_prompt, engine_kwargs, preemptions, random_video, shutdown, video_metadata

pytestmark = pytest.mark.engine  # starts a vLLM engine or server

MAX_TOKENS = 160


@pytest.fixture(scope="module")
def llm(checkpoint):
    llm = LLM(
        **engine_kwargs(
            checkpoint,
            max_model_len=1024,
            max_num_batched_tokens=1024,
            # the smallest pool vLLM accepts at 1024 tokens (the null block, 5 Mamba groups, 3 stage groups x 8
            # blocks of 128): about one of the four ~450-token requests at its full length
            num_gpu_blocks_override=30,
            disable_log_stats=False,
            additional_config={"stateful_reduce": {"min_keep": 4, "record_kept": True}},
        )
    )
    yield llm
    shutdown(llm)


def kept_by_request(llm) -> dict:
    kept = llm.collective_rpc(lambda w: dict(w.model_runner.model.reduction_state.kept))[0]
    return {k.split("-")[0]: v for k, v in kept.items()}


def test_preempted_requests_recompute_to_the_same_tokens(llm) -> None:
    videos = [random_video(16, seed=10 + i) for i in range(4)]
    prompts = [
        {"prompt": chat_prompt("What moves?"), "multi_modal_data": {"video": (v, video_metadata(16))}} for v in videos
    ]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    before = preemptions(llm)
    together = llm.generate(prompts, params)
    preempted = preemptions(llm) - before
    kept_together = kept_by_request(llm)
    print(f"{preempted} preemptions while serving 4 reduced requests together")
    assert preempted > 0, "the KV cache was meant to be too small for the batch"
    for i, prompt in enumerate(prompts):
        alone = llm.generate([prompt], params)[0]
        assert preemptions(llm) - before == preempted  # one request alone fits
        assert alone.outputs[0].token_ids == together[i].outputs[0].token_ids, i
        assert kept_by_request(llm)[alone.request_id] == kept_together[together[i].request_id], i
