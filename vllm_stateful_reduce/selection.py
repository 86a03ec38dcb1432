"""Which visual tokens stay at a stage boundary, for all reducing requests at once.

Everything here runs on the device with sizes known on the host (from the plan), so
a boundary costs a few batched tensor ops and no device read: one stable sort over
the padded [requests, visual tokens] scores picks each request's top-k (k from the
schedule), the winners are put back in prompt order, and a keep mask over the
stage's rows becomes the gather index of the next stage by a prefix sum.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Kept:
    """The reducing requests' visual tokens in the current stage (padded, on the device)."""

    rows: torch.Tensor  # (R, V) int64 row in the stage's packed batch; -1 pads
    positions: torch.Tensor  # (R, V) int64 prompt position; -1 pads
    scores: torch.Tensor  # (R, V) float32 block scores summed over this stage

    @property
    def valid(self) -> torch.Tensor:
        return self.rows >= 0

    def with_scores(self, added: torch.Tensor) -> "Kept":
        return Kept(self.rows, self.positions, self.scores + added)

    def restarted(self) -> "Kept":
        return Kept(self.rows, self.positions, torch.zeros_like(self.scores))


def top_k(scores: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor, k_max: int) -> torch.Tensor:
    """(R, k_max) indices of each row's `counts[r]` best valid scores, ascending (prompt
    order); columns past counts[r] hold V. Ties go to the earlier token (stable sort)."""
    width = scores.shape[1]
    ranked = torch.sort(scores.masked_fill(~valid, float("-inf")), dim=1, descending=True, stable=True).indices
    chosen = ranked[:, :k_max]
    taken = torch.arange(k_max, device=scores.device)[None, :] < counts[:, None]
    return torch.sort(chosen.masked_fill(~taken, width), dim=1).values


def compact(
    kept: Kept, chosen: torch.Tensor, num_rows: int, num_rows_next: int, carry_scores: bool
) -> tuple[torch.Tensor, Kept]:
    """Keep the `chosen` visual tokens (from `top_k`) and every other row.

    Returns the gather index (num_rows_next,) into the current stage's rows and the
    next stage's `Kept`; its scores start at zero unless `carry_scores` (a stage
    without scoring blocks selects again with what it inherited).
    """
    device = kept.rows.device
    taken = chosen < kept.rows.shape[1]
    picked = chosen.clamp(max=kept.rows.shape[1] - 1)
    rows = kept.rows.gather(1, picked).masked_fill(~taken, -1)
    # 1. keep mask over the stage's rows (slot num_rows absorbs the padding)
    stay = torch.ones(num_rows + 1, dtype=torch.bool, device=device)
    stay[_or_dump(kept.rows, num_rows).flatten()] = False
    stay[_or_dump(rows, num_rows).flatten()] = True
    stay = stay[:num_rows]
    # 2. new row of every kept row, and the gather index that realises it
    new_row = torch.cumsum(stay, 0) - 1
    index = torch.zeros(num_rows_next + 1, dtype=torch.int64, device=device)
    index.scatter_(0, torch.where(stay, new_row, num_rows_next), torch.arange(num_rows, device=device))
    # 3. the kept tokens in the new layout, in prompt order
    next_rows = torch.where(taken, new_row[rows.clamp_min(0)], -1)
    positions = kept.positions.gather(1, picked).masked_fill(~taken, -1)
    scores = (
        kept.scores.gather(1, picked).masked_fill(~taken, 0.0)
        if carry_scores
        else torch.zeros_like(rows, dtype=torch.float32)
    )
    return index[:num_rows_next], Kept(next_rows, positions, scores)


def _or_dump(rows: torch.Tensor, dump: int) -> torch.Tensor:
    return torch.where(rows >= 0, rows, dump)
