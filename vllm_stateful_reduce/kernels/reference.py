"""Plain PyTorch definitions of the kernels: what each one computes, formula first."""

import torch


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[i] = x[index[i]] (compaction of hidden states / residuals)."""
    return x.index_select(0, index)


def attention_scores(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean attention each key receives from the query rows.

    q: (T, Hq, d) query rows; k: (L, Hk, d) keys of the same request (GQA: Hq % Hk == 0);
    q_pos: (T,) key index of each query row (it sees keys 0..q_pos[t]).
    Returns (L,) float32:  out[s] = 1/(T*Hq) sum_{t,h} softmax_s(q_th . k_s * scale)  (causal).
    Only T x L logits per head: never L x L.
    """
    hq, hk = q.shape[1], k.shape[1]
    kx = k.float().repeat_interleave(hq // hk, dim=1)  # (L, Hq, d)
    logits = torch.einsum("thd,shd->hts", q.float(), kx) * scale
    visible = torch.arange(k.shape[0], device=k.device)[None, :] <= q_pos[:, None].to(k.device)
    probs = torch.softmax(logits.masked_fill(~visible[None], float("-inf")), dim=-1)
    return probs.sum(dim=(0, 1)) / (q.shape[0] * hq)


def mamba_scores(c: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Implicit-attention proxy of Mamba2 without the decay.

    c: (T, G, N) C of the query rows; b: (L, G, N) B of the scored tokens;
    weight: (L, G) per-token, per-group factor (e.g. summed dt of the group's heads) or None.
    Returns (L,) float32:  out[s] = 1/T sum_{t,g} |C_tg . B_sg| * weight_sg.
    """
    cb = torch.einsum("tgn,sgn->tsg", c.float(), b.float()).abs()
    if weight is not None:
        cb = cb * weight.float()[None]
    return cb.sum(dim=(0, 2)) / c.shape[0]
