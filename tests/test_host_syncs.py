"""Host syncs of a reduced prefill: O(stages), not O(blocks x requests).

On a GPU, every device read (`.item()`, `.tolist()`, `.cpu()`, `bool(t)`, `nonzero`,
...) stalls the host until the queued work is done. The CPU build cannot stall, so
the test counts these calls instead while the language model's forward runs: those
made by the plugin's own code (the innermost caller outside torch is in
`vllm_stateful_reduce`). Calls inside vLLM's code are vLLM's: its layers (the same
with reduction off) and its metadata helpers, which read host (`*_cpu`) tensors by
design; they are reported, not bounded. The engine core runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so requests added together are prefilled in one
step.
"""

import os
import sys
from contextlib import contextmanager

import pytest
import torch
from vllm import LLM, SamplingParams

import vllm_stateful_reduce

from vllm_stateful_reduce.model.reduced_stack import ReducibleNemotronHModel

from .conftest import chat_prompt, engine_kwargs, random_video, shutdown, video_metadata

GLOBAL = {"min_keep": 4}
SYNCING_METHODS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")
SYNCING_FUNCTIONS = ("nonzero", "masked_select", "unique")
TORCH = os.path.dirname(torch.__file__)
PLUGIN = os.path.dirname(vllm_stateful_reduce.__file__)


@contextmanager
def counting_syncs():
    """Yields a list that gets one {"syncs", "sites", "vllm", "reducing"} per LM forward."""
    counts: list[dict] = []
    active = [False]

    def counting(original):
        def wrapper(*args, **kwargs):
            if active[0]:
                frame = sys._getframe(1)
                while frame.f_code.co_filename.startswith(TORCH):
                    frame = frame.f_back
                if frame.f_code.co_filename.startswith(PLUGIN):
                    counts[-1]["syncs"] += 1
                    counts[-1]["sites"].append(f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}")
                else:
                    counts[-1]["vllm"] += 1
            return original(*args, **kwargs)

        return wrapper

    forward = ReducibleNemotronHModel.forward

    def counted_forward(self, *args, **kwargs):
        fresh = sum(1 for r in self.batch_requests if r.num_computed == 0 and r.config.enabled)
        counts.append({"syncs": 0, "sites": [], "vllm": 0, "reducing": fresh})
        active[0] = True
        try:
            return forward(self, *args, **kwargs)
        finally:
            active[0] = False

    saved = [(torch.Tensor, n, getattr(torch.Tensor, n)) for n in SYNCING_METHODS]
    saved += [(torch, n, getattr(torch, n)) for n in SYNCING_FUNCTIONS]
    saved.append((ReducibleNemotronHModel, "forward", forward))
    try:
        for owner, name, original in saved[:-1]:
            setattr(owner, name, counting(original))
        ReducibleNemotronHModel.forward = counted_forward
        yield counts
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


@pytest.fixture(scope="module")
def llm(checkpoint):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        llm = LLM(**engine_kwargs(checkpoint, additional_config={"stateful_reduce": GLOBAL}))
    finally:
        del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
    yield llm
    shutdown(llm)


def requests(count: int, options: dict | None) -> list[dict]:
    out = []
    for i in range(count):
        video = random_video(12 + 4 * i, seed=10 + i)
        req = {"prompt": chat_prompt("What is in the video?"), "multi_modal_data": {"video": (video, video_metadata(len(video)))}}
        if options is not None:
            req["mm_processor_kwargs"] = {"stateful_reduce": options}
        out.append(req)
    return out


def counted_run(llm, count: int, options: dict | None) -> list[dict]:
    with counting_syncs() as counts:
        llm.generate(requests(count, options), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    return counts


def test_reduced_prefill_syncs_do_not_grow_with_requests(llm) -> None:
    prefill = {}
    for count in (1, 4):
        plain = counted_run(llm, count, {"enabled": False})
        assert all(c["syncs"] == 0 for c in plain), plain  # the plain path reads nothing itself
        reduced = counted_run(llm, count, None)
        assert reduced[0]["reducing"] == count, reduced  # all prefilled in one step
        prefill[count] = reduced[0]
        decode = [c["syncs"] for c in reduced[1:]]
        print(
            f"{count} reducing request(s): prefill step {reduced[0]['syncs']} reads by the plugin at "
            f"{reduced[0]['sites']}, {reduced[0]['vllm']} in vLLM's code ({plain[0]['vllm']} with reduction off); "
            f"decode steps {decode}"
        )
        assert decode and all(d == 0 for d in decode)
    stages = 4  # the test checkpoint: boundaries after its 3 attention blocks
    assert prefill[4]["syncs"] == prefill[1]["syncs"], prefill
    assert prefill[4]["syncs"] <= stages, prefill  # the record of kept positions needs one read
