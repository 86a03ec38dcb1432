"""EVS (efficient video sampling) after the vision tower, as vLLM's in-tree model does it.

With EVS the processor shortened a video's prompt to vLLM's retained count, all of it
in the first frame's slot (which frames keep how many tokens is only known from the
embeddings). After the vision tower:

1. vLLM's `compute_retention_mask` keeps the tokens that changed most since the
   previous frame (the first frame always);
2. the video's real prompt ids follow from the per-frame counts (`video_token_ids`);
3. the video's embeddings cover that whole span: text embeddings for the frame
   separators and wrappers, the retained visual embeddings at the visual slots.

The span has the prompt's length, so vLLM places it as it placed the prompt; but the
prompt's ids still show the first-frame layout. The reduction planner needs the real
one: it is recorded on the embedding tensor (`media_fields.record_layout`), which the
runner keeps in its encoder cache under the item's hash, and read back by the runner
glue before the step is planned.
"""

from collections.abc import Callable, Sequence

import torch
from vllm.multimodal.video_prune.evs import compute_retention_mask

from ..media_fields import record_layout


def evs_video_embeddings(
    features: torch.Tensor,
    rate: float,
    token_ids: Callable[[Sequence[int]], list[int]],
    context_id: int,
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """(frames, tokens_per_frame, hidden) visual features -> (span, hidden) embeddings of
    the whole EVS-pruned video; `token_ids(per-frame counts)` gives its prompt ids."""
    frames, per_frame, hidden = features.shape
    side = int(round(per_frame**0.5))
    flat = features.reshape(frames * per_frame, hidden)
    mask = compute_retention_mask(flat, (frames, side, side), 1, rate)  # (frames * per_frame,)
    ids = token_ids(mask.view(frames, per_frame).sum(dim=1).tolist())
    ids_t = torch.tensor(ids, device=features.device)
    out = embed_tokens(ids_t).to(features.dtype)
    out[ids_t == context_id] = flat[mask]
    return record_layout(out, ids)
