"""Positions the device learns: a step launched before the host knows how many drafts the step before accepted
places each such item's tokens from where the host thought it starts, and the device moves them on by the
accepted count (read where the step before left it) before the pass. Positions, KV slots and context lengths
move together; the blocks for the furthest place are reserved by the scheduler."""

from __future__ import annotations

import numpy as np
import torch

from scheduler.tensors import to_device
from scheduler.worker.packing import ForwardItem, StepInputs, as_inputs


def shift_plan(items: list[ForwardItem] | StepInputs, device_shifts: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(the item of each packed token, each item's shift) on the device, items in the order given; an item moves by
    device_shifts[its device_row], one without a device row stays. None when no item moves."""
    inputs = as_inputs(items)
    count = len(inputs)
    rows = inputs.device_rows.copy()
    if not (rows >= 0).any():
        return None
    rows[rows < 0] = device_shifts.shape[0]  # a zero appended below
    query_lens = inputs.query_lens
    token_item = np.repeat(np.arange(count), query_lens)
    token_item, rows = to_device(np.concatenate([token_item, rows]), torch.long, device_shifts.device).split(
        [len(token_item), count])  # one copy
    return token_item, torch.cat([device_shifts.long(), device_shifts.new_zeros(1, dtype=torch.long)])[rows]


def apply_shifts(plan: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor, slots: torch.Tensor,
                 seq_lens: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> None:
    """Move the packed tokens' positions and KV slots, and the items' context lengths, in place. positions and
    slots hold the real tokens only (padding keeps its slot -1); block_tables has a row for each item, in order."""
    token_item, item_shift = plan
    positions.add_(item_shift[token_item].to(positions.dtype))
    seq_lens[:item_shift.shape[0]].add_(item_shift.to(seq_lens.dtype))
    moved = positions.long()
    blocks = block_tables[token_item, moved // block_size].long()
    slots.copy_((blocks * block_size + moved % block_size).to(slots.dtype))
