"""NemotronH blocks that also hand back the projection their scores are read from.

Given to vLLM's `NemotronHModel` through its `decoder_layer_types` mapping: their
`forward` is vLLM's own (the plain stack calls it); the reduced stack calls
`forward_scored` on the blocks that score, which returns the same outputs plus what
their scores are read from: the qkv projection of every row of the batch (attention),
or the in_proj output and the scan's B and C (Mamba2, `scoring.MambaProjection`).
"""

import torch
from vllm.model_executor.models.nemotron_h import (
    ALL_DECODER_LAYER_TYPES,
    NemotronHAttentionDecoderLayer,
    NemotronHMambaDecoderLayer,
)

from ..vllm_compat import attention_forward_with_qkv, mamba_forward_with_projection


def _pre_norm(norm, hidden_states: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is None:
        return norm(hidden_states), hidden_states
    return norm(hidden_states, residual)


class ScoredAttentionDecoderLayer(NemotronHAttentionDecoderLayer):
    def forward_scored(self, hidden_states: torch.Tensor, residual: torch.Tensor | None):
        """(output, residual, qkv projection)."""
        hidden_states, residual = _pre_norm(self.norm, hidden_states, residual)
        output, qkv = attention_forward_with_qkv(self.mixer, hidden_states)
        return output, residual, qkv


class ScoredMambaDecoderLayer(NemotronHMambaDecoderLayer):
    def forward_scored(self, hidden_states: torch.Tensor, residual: torch.Tensor | None):
        """(output, residual, MambaProjection)."""
        hidden_states, residual = _pre_norm(self.norm, hidden_states, residual)
        output, projected = mamba_forward_with_projection(self.mixer, hidden_states)
        return output, residual, projected


SCORED_LAYER_TYPES = {**ALL_DECODER_LAYER_TYPES, "*": ScoredAttentionDecoderLayer, "M": ScoredMambaDecoderLayer}
