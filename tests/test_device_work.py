"""What a reduced prefill asks of the device, checked in one in-process engine:
host syncs O(stages), every kernel input on the hidden states' device, and Model
Runner V2's state class handing the model the same batch as the V1 glue.

Host syncs: O(stages), not O(blocks x requests).

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

from .helpers import chat_prompt, engine_kwargs, random_video, shutdown, video_metadata

pytestmark = pytest.mark.engine  # starts a vLLM engine or server

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
        fresh = sum(1 for r in self.batch.requests if r.num_computed == 0 and r.config.enabled)
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
        req = {
            "prompt": chat_prompt("What is in the video?"),
            "multi_modal_data": {"video": (video, video_metadata(len(video)))},
        }
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


# ---------------------------------------------------------------- device audit
#
# A Triton kernel cannot take a host pointer, and the CPU build cannot show a device
# mix-up by failing: so every tensor the kernel entry points receive during a reduced
# forward is checked against the hidden states' device (and index / data dtypes).
# torch_ops and the Triton kernels share these signatures (kernels/torch_ops.py).

KERNEL_ENTRY_POINTS = ("attention_scores", "mamba_scores", "gather_rows")


@contextmanager
def auditing_kernel_inputs():
    """Yields a list of (entry point, argument name, device, dtype) of every tensor passed."""
    import inspect

    from vllm_stateful_reduce.kernels import torch_ops
    from vllm_stateful_reduce.kernels.torch_ops import Varlen

    seen: list[tuple[str, str, torch.device, torch.dtype]] = []
    saved = {name: getattr(torch_ops, name) for name in KERNEL_ENTRY_POINTS}

    def audited(name, original):
        signature = inspect.signature(original)

        def wrapper(*args, **kwargs):
            for arg, value in signature.bind(*args, **kwargs).arguments.items():
                if isinstance(value, Varlen):
                    value = value.device
                if isinstance(value, torch.Tensor):
                    seen.append((name, arg, value.device, value.dtype))
            return original(*args, **kwargs)

        return wrapper

    try:
        for name, original in saved.items():
            setattr(torch_ops, name, audited(name, original))
        yield seen
    finally:
        for name, original in saved.items():
            setattr(torch_ops, name, original)


def test_kernel_inputs_live_on_the_hidden_states_device(llm) -> None:
    hidden_devices = []
    forward = ReducibleNemotronHModel._reduced_forward

    def recording(self, plan, timer, input_ids, positions, inputs_embeds):
        hidden_devices.append((inputs_embeds if inputs_embeds is not None else input_ids).device)
        return forward(self, plan, timer, input_ids, positions, inputs_embeds)

    from vllm_stateful_reduce.adapter import stage_metadata as metadata

    build = metadata.attention_metadata
    tables = []

    def recording_metadata(group, block_table, *args):
        built, slots = build(group, block_table, *args)
        tables.append((block_table.device, slots.device, slots.dtype))
        return built, slots

    ReducibleNemotronHModel._reduced_forward = recording
    metadata.attention_metadata = recording_metadata
    try:
        with auditing_kernel_inputs() as seen:
            llm.generate(requests(2, {"evs_rate": 0.25}), SamplingParams(max_tokens=2, temperature=0.0))
    finally:
        ReducibleNemotronHModel._reduced_forward = forward
        metadata.attention_metadata = build
    assert hidden_devices, "no reduced forward ran"
    # kept positions are read back from the device only when asked (`record_kept`)
    assert not llm.collective_rpc(lambda w: dict(w.model_runner.model.reduction_state.kept))[0]
    device = hidden_devices[0]
    called = {name for name, *_ in seen}
    assert called == set(KERNEL_ENTRY_POINTS), called
    wrong = [(n, a, d) for n, a, d, _ in seen if d != device]
    assert not wrong, f"kernel inputs off {device}: {wrong}"
    index_args = {"queries", "keys", "v_rows", "index"}
    for name, arg, _, dtype in seen:
        if arg in index_args:
            assert dtype in (torch.int32, torch.int64), (name, arg, dtype)
        else:
            assert dtype.is_floating_point, (name, arg, dtype)
    assert tables and all(t[:2] == (device, device) and t[2] == torch.int64 for t in tables), tables
    print(
        f"{len(seen)} kernel inputs in {len(called)} entry points and {len(tables)} stage block tables / slot "
        f"mappings, all on {device}"
    )


# ---------------------------------------------------------------- Model Runner V2
#
# The CPU build runs the V1 runner only; MRv2 needs a GPU. What can run here: the
# plugin's MRv2 state class, built like MRv2 builds it (`init_model_state`), fed the
# requests of a real V1 step through `add_request` (NewRequestData from the runner's
# own request records) and a real MRv2 `InputBatch` with that step's counts: the rows
# it hands the model must equal those the V1 glue handed for the same step.


def test_model_runner_v2_state_hands_the_model_the_v1_batch(llm) -> None:
    import dataclasses

    import numpy as np
    from vllm.v1.core.sched.output import NewRequestData
    from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers
    from vllm.v1.worker.gpu.model_states import init_model_state

    from vllm_stateful_reduce.adapter.model_state import model_state_cls, mrv2_batch
    from vllm_stateful_reduce.model.nano_vl import NemotronNanoVLStatefulReduce
    from vllm_stateful_reduce.state import RunnerBatch

    runner = llm.collective_rpc(lambda worker: worker.model_runner)[0]  # in-process engine
    model = runner.get_model()
    steps = []
    set_batch = NemotronNanoVLStatefulReduce.set_batch

    def recording(self, batch: RunnerBatch):
        if batch.requests:
            steps.append((list(batch.requests), {r.req_id: runner.requests[r.req_id] for r in batch.requests}))
        return set_batch(self, batch)

    NemotronNanoVLStatefulReduce.set_batch = recording
    try:
        reqs = requests(2, None)
        reqs[1]["mm_processor_kwargs"] = {"stateful_reduce": {"budget": 0.5}}
        llm.generate(reqs, SamplingParams(max_tokens=2, temperature=0.0))
    finally:
        NemotronNanoVLStatefulReduce.set_batch = set_batch
    v1_rows, records = steps[0]  # the prefill step of both
    assert [r.config for r in v1_rows] == [model.request_config(None), model.request_config({"budget": 0.5})]

    state = init_model_state(runner.vllm_config, model, None, runner.device)
    assert type(state) is model_state_cls()
    for index, row in enumerate(v1_rows):
        req_id = row.req_id
        record = records[req_id]
        state.add_request(
            index,
            NewRequestData(
                req_id=req_id,
                prompt_token_ids=record.prompt_token_ids,
                mm_features=record.mm_features,
                sampling_params=record.sampling_params,
                pooling_params=None,
                block_ids=record.block_ids,
                num_computed_tokens=0,
                lora_request=None,
                prefill_token_ids=record.prompt_token_ids,
            ),
        )
    scheduled = np.array([r.num_scheduled for r in v1_rows], dtype=np.int32)
    buffers = InputBuffers(max_num_reqs=4, max_num_tokens=int(scheduled.sum()), device=runner.device)
    batch = dataclasses.replace(
        InputBatch.make_dummy(len(v1_rows), int(scheduled.sum()), buffers),
        req_ids=[r.req_id for r in v1_rows],
        num_scheduled_tokens=scheduled,
        num_computed_tokens_np=np.array([r.num_computed for r in v1_rows], dtype=np.int32),
    )
    mrv2 = mrv2_batch(batch, state.prompts, model, ())
    assert [dataclasses.replace(r, prompt_token_ids=list(r.prompt_token_ids)) for r in mrv2.requests] == [
        dataclasses.replace(r, prompt_token_ids=list(r.prompt_token_ids)) for r in v1_rows
    ]
    dummy = mrv2_batch(InputBatch.make_dummy(2, 8, buffers), state.prompts, model, ())
    assert dummy == RunnerBatch()  # a dummy run: plain forward
    state.remove_request(v1_rows[0].req_id)
    assert list(state.prompts) == [v1_rows[1].req_id]
    assert model.attention_groups_bound()  # the V1 glue bound them at start-up
