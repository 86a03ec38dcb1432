"""Slots of a compacted stage address the same KV memory the backend's kernel blocks do.

GPU attention backends may run with kernel blocks smaller than the KV-cache manager's
(the runner maps block tables with `AttentionGroup.map_to_kernel_block_table`; vLLM
writes K/V through slot mappings in manager blocks). The plugin computes a stage's slots
in manager blocks and hands the builder the group's kernel table: both must name the
same (page, offset) for every logical position. Checked with vLLM's own AttentionGroup
(the CPU build never splits blocks: its backend takes multiples of 32).
"""

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.worker.utils import AttentionGroup

from vllm_stateful_reduce.adapter.stage_metadata import logical_slots


def test_manager_block_slots_match_the_kernel_block_table() -> None:
    g = torch.Generator().manual_seed(0)
    manager, kernel, requests, width = 64, 16, 3, 5
    spec = FullAttentionSpec(block_size=manager, num_kv_heads=2, head_size=32, dtype=torch.float32)
    per_block = manager // kernel
    group = AttentionGroup(
        CPUAttentionBackend,
        ["layer"],
        spec,
        0,
        kernel_block_size=kernel,
        kernel_block_table=torch.zeros(1, requests, width * per_block, dtype=torch.int32),
        kernel_block_offsets=torch.arange(per_block, dtype=torch.int32),
    )
    table = torch.randperm(40, generator=g)[: requests * width].view(requests, width).int() + 1
    request = torch.randint(0, requests, (500,), generator=g)
    logical = torch.randint(0, width * manager, (500,), generator=g)
    slots = logical_slots(table, request, logical, manager)
    kernel_table = group.map_to_kernel_block_table(table)
    kernel_slots = kernel_table[request, logical // kernel].long() * kernel + logical % kernel
    assert torch.equal(slots, kernel_slots)
    assert len(set(slots.tolist())) == len(
        set(zip(request.tolist(), logical.tolist(), strict=True))
    )  # no two positions share a slot


def test_attention_backends_the_plugin_does_not_rebuild_are_refused() -> None:
    from vllm.v1.attention.backends.flex_attention import FlexAttentionBackend
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

    from vllm_stateful_reduce.adapter.stage_metadata import attention_backend_problem

    spec = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=32, dtype=torch.float32)
    group = lambda backend: AttentionGroup(backend, ["layer"], spec, 0)  # noqa: E731
    assert attention_backend_problem([group(CPUAttentionBackend), group(TritonAttentionBackend)]) is None
    problem = attention_backend_problem([group(CPUAttentionBackend), group(FlexAttentionBackend)])
    assert "not FLEX_ATTENTION" in problem and "--attention-backend FLASH_ATTN" in problem
