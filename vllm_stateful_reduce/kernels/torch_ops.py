"""Plain PyTorch definitions of the kernels: what each one computes, formula first.

The scoring kernels take a varlen batch: the reducing requests of one step, packed
row after row. `Varlen` says where each request's rows are, with host copies for
Python loops (these torch ops) and a device copy for kernels (Triton), both made
when the step is planned, so neither implementation reads the device to find out.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Varlen:
    """Segments of a packed batch: request r owns rows starts[r] : starts[r] + lengths[r]."""

    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    device: torch.Tensor  # (2, R) int32: [starts; lengths], on the packed tensors' device

    @classmethod
    def of(cls, starts: list[int], lengths: list[int], device: torch.device | str = "cpu") -> "Varlen":
        """Build one (uploads a small tensor: planning code packs its uploads instead)."""
        table = torch.tensor([list(starts), list(lengths)], dtype=torch.int32).reshape(2, len(starts))
        return cls(tuple(starts), tuple(lengths), table.to(device))

    def __len__(self) -> int:
        return len(self.starts)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[i] = x[index[i]] (compaction of hidden states / residuals)."""
    return x.index_select(0, index)


def attention_scores(
    q: torch.Tensor, k: torch.Tensor, queries: Varlen, keys: Varlen, v_rows: torch.Tensor, scale: float
) -> torch.Tensor:
    """Mean softmax attention each scored key receives from its request's query rows.

    q: (T, Hq, d) query rows, request r's at queries.starts[r] (+ lengths[r]); they are
       the *last* rows of the request, so query i of r sits at key index
       keys.lengths[r] - queries.lengths[r] + i and sees keys 0..that index (causal);
    k: (L, Hk, d) keys of the packed batch, request r's at keys.starts[r] (GQA: Hq % Hk == 0);
    v_rows: (R, V) int64 rows of k to score per request (inside its segment); -1 pads.
    Returns (R, V) float32, 0 at padding:
        out[r, j] = 1/(T_r Hq) sum_{t in r, h} softmax_s(q_th . k_s * scale)[s = v_rows[r, j]].
    Only T_r x L_r logits per request and head: never L x L.
    """
    out = torch.zeros(v_rows.shape, dtype=torch.float32, device=q.device)
    hq, hk, d = q.shape[1], k.shape[1], q.shape[2]
    group = hq // hk
    for r, (q0, nq, k0, nk) in enumerate(zip(queries.starts, queries.lengths, keys.starts, keys.lengths, strict=True)):
        if nq == 0:
            continue
        # causal: query t sees keys 0..L_r - T + t, so only the last T columns can be hidden
        t = torch.arange(nq, device=q.device).repeat_interleave(group)  # query of each row
        hidden = torch.arange(nq, device=q.device)[None, :] > t[:, None]  # (T*group, T)
        # scale folded into the few query rows; keys contiguous per KV head
        qr = (q[q0 : q0 + nq].float() * scale).view(nq, hk, group, d).transpose(0, 1).reshape(hk, nq * group, d)
        kr = k[k0 : k0 + nk].float().transpose(0, 1).contiguous()  # (Hk, L_r, d)
        per_key = torch.zeros(nk, dtype=torch.float32, device=q.device)
        for h in range(hk):  # one KV head at a time: (T*group, L_r) logits stay small
            logits = F.linear(qr[h], kr[h])
            logits[:, nk - nq :].masked_fill_(hidden, float("-inf"))
            per_key += torch.softmax(logits, dim=-1).sum(0)
        per_key /= nq * hq
        cols = v_rows[r]
        valid = cols >= 0
        out[r] = torch.where(valid, per_key[(cols - k0).clamp(0, nk - 1)], 0.0)
    return out


def mamba_scores(
    c: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None, queries: Varlen, v_rows: torch.Tensor
) -> torch.Tensor:
    """Implicit-attention proxy of Mamba2 without the decay.

    c: (T, G, N) C of the query rows, request r's at queries.starts[r] (+ lengths[r]);
    b: (L, G, N) B of the packed batch; weight: (L, G) per-token, per-group factor
       (e.g. the summed dt of the group's heads) or None;
    v_rows: (R, V) int64 rows of b to score per request; -1 pads.
    Returns (R, V) float32, 0 at padding:
        out[r, j] = 1/T_r sum_{t in r, g} |C_tg . B_sg| * weight_sg,  s = v_rows[r, j].
    """
    out = torch.zeros(v_rows.shape, dtype=torch.float32, device=c.device)
    for r, (q0, nq) in enumerate(zip(queries.starts, queries.lengths, strict=True)):
        if nq == 0:
            continue
        cols = v_rows[r]
        valid = cols >= 0
        rows = cols.clamp_min(0)
        # B gathered and converted once for all groups; one batched GEMM over the groups
        # (a loop over groups cost ~10 more small ops per call, most of a call past 1k rows)
        c_r = c[q0 : q0 + nq].float().transpose(0, 1)  # (G, T, N)
        b_r = b.index_select(0, rows).float().permute(1, 2, 0)  # (G, N, V)
        per_group = torch.bmm(c_r, b_r).abs_().sum(1)  # (G, V)
        if weight is not None:
            per_group *= weight.index_select(0, rows).float().T
        out[r] = torch.where(valid, per_group.sum(0) / nq, 0.0)
    return out
