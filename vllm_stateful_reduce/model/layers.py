"""NemotronH blocks that also hand back the projection their scores are read from.

Given to vLLM's `NemotronHModel` through its `decoder_layer_types` mapping. Both
forwards run vLLM's own block forward; `forward_scored` (the reduced stack calls it on
the blocks that score) also returns what the scores are read from, taken while it runs
(`adapter.mixer_taps`): the qkv projection of every row of the batch (attention), or
the in_proj output and the scan's B and C (Mamba2, `mixer_taps.MambaProjection`).
"""

import torch
from vllm.model_executor.models.nemotron_h import (
    ALL_DECODER_LAYER_TYPES,
    NemotronHAttentionDecoderLayer,
    NemotronHMambaDecoderLayer,
)

from ..adapter.mixer_taps import run_with_projection, run_with_qkv


class ScoredAttentionDecoderLayer(NemotronHAttentionDecoderLayer):
    def forward_scored(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None):
        """(output, residual, qkv projection)."""
        run = lambda: self(positions=positions, hidden_states=hidden_states, residual=residual)  # noqa: E731
        (output, residual), qkv = run_with_qkv(self.mixer, run)
        return output, residual, qkv


class ScoredMambaDecoderLayer(NemotronHMambaDecoderLayer):
    def forward_scored(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None):
        """(output, residual, MambaProjection)."""
        run = lambda: self(positions=positions, hidden_states=hidden_states, residual=residual)  # noqa: E731
        (output, residual), projected = run_with_projection(self.mixer, run)
        return output, residual, projected


SCORED_LAYER_TYPES = {**ALL_DECODER_LAYER_TYPES, "*": ScoredAttentionDecoderLayer, "M": ScoredMambaDecoderLayer}
