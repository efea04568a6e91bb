"""One forward pass's sequences and how their tokens are packed end to end: positions, KV slots,
logits rows, block tables, and where tokens the device holds go."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class ForwardItem:
    """One sequence's part of a forward pass."""

    token_ids: list[int]  # the new tokens to compute
    start: int  # position of the first of them: the tokens already in the cache
    block_table: list[int]
    num_logits: int  # logits wanted for this many trailing tokens (0 = none)
    # Its last num_device_tokens tokens are placeholders: the real ones are row device_row of the
    # device_tokens given to ModelRunner.forward (drafts the host has not seen yet).
    device_row: int = -1
    num_device_tokens: int = 0


@dataclass(slots=True)
class StepInputs:
    """A forward pass's sequences as arrays, row i for sequence i (ForwardItem's fields, one array each): what the
    runner packs from. Built from the persistent batch (scheduler/worker/input_batch.py) by vector operations, or
    from ForwardItems (from_items)."""

    query_lens: np.ndarray  # int64 [n]: new tokens of each sequence
    starts: np.ndarray  # int64 [n]: tokens already in its cache
    num_logits: np.ndarray  # int64 [n]
    token_ids: np.ndarray  # int64 [sum query_lens]: every sequence's new tokens end to end (placeholders 0)
    block_tables: np.ndarray  # int [n, >= max num_blocks]: row i starts with sequence i's block ids
    num_blocks: np.ndarray  # int64 [n]
    device_rows: np.ndarray  # int64 [n]: ForwardItem.device_row
    num_device_tokens: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return len(self.query_lens)

    @classmethod
    def from_items(cls, items: list[ForwardItem]) -> StepInputs:
        count = len(items)

        def column(values) -> np.ndarray:
            return np.fromiter(values, np.int64, count)

        query_lens = column(len(it.token_ids) for it in items)
        num_blocks = column(len(it.block_table) for it in items)
        tables = np.zeros((count, int(num_blocks.max()) if count else 0), dtype=np.int64)
        ids = np.fromiter(itertools.chain.from_iterable(it.block_table for it in items), np.int64,
                          int(num_blocks.sum()))
        tables[np.arange(tables.shape[1]) < num_blocks[:, None]] = ids  # row-major: each row's ids in order
        token_ids = np.fromiter(itertools.chain.from_iterable(it.token_ids for it in items), np.int64,
                                int(query_lens.sum()))
        return cls(query_lens, column(it.start for it in items), column(it.num_logits for it in items), token_ids,
                   tables, num_blocks, column(it.device_row for it in items),
                   column(it.num_device_tokens for it in items))

    def take(self, order: np.ndarray) -> StepInputs:
        """The same sequences in the given order."""
        starts_in = np.cumsum(self.query_lens) - self.query_lens
        lens = self.query_lens[order]
        tokens = np.repeat(starts_in[order], lens) + (np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens,
                                                                                              lens))
        return StepInputs(lens, self.starts[order], self.num_logits[order], self.token_ids[tokens],
                          self.block_tables[order], self.num_blocks[order], self.device_rows[order],
                          self.num_device_tokens[order])


def as_inputs(items: list[ForwardItem] | StepInputs) -> StepInputs:
    return items if isinstance(items, StepInputs) else StepInputs.from_items(items)


def fill_block_tables(tables: np.ndarray, inputs: list[ForwardItem] | StepInputs) -> None:
    """Row i of tables starts with sequence i's block ids (the rest of the row is left as it is, or holds ids past
    the sequence's own, which nothing reads)."""
    inputs = as_inputs(inputs)
    width = min(tables.shape[1], inputs.block_tables.shape[1])
    tables[:len(inputs), :width] = inputs.block_tables[:, :width]


def positions_and_slots(query_lens, query_start_loc, starts, block_tables, block_size: int):
    """Each new token's position in its sequence and its KV-cache slot, tokens laid end to end."""
    seq_of_token = np.repeat(np.arange(len(query_lens)), query_lens)
    positions = np.arange(query_start_loc[len(query_lens)]) - query_start_loc[seq_of_token] + starts[seq_of_token]
    slots = block_tables[seq_of_token, positions // block_size] * block_size + positions % block_size
    return positions, slots


def device_token_patch(inputs: list[ForwardItem] | StepInputs, row_width: int) -> np.ndarray | None:
    """[2, n]: where in the packed input ids each device-held token goes, and its index in the
    flattened device_tokens; None when no sequence has any."""
    inputs = as_inputs(inputs)
    num_device = inputs.num_device_tokens
    total = int(num_device.sum())
    if not total:
        return None
    ends = np.cumsum(inputs.query_lens)
    within = np.arange(total) - np.repeat(np.cumsum(num_device) - num_device, num_device)  # 0.. n-1 in each row
    dest = np.repeat(ends - num_device, num_device) + within
    src = np.repeat(inputs.device_rows * row_width, num_device) + within
    return np.stack([dest, src])


def logits_indices(query_lens: np.ndarray, num_logits: np.ndarray) -> np.ndarray:
    """Rows of each sequence's last num_logits tokens, sequences laid end to end."""
    ends = np.cumsum(query_lens)
    return np.repeat(ends - num_logits, num_logits) + (
        np.arange(num_logits.sum()) - np.repeat(np.cumsum(num_logits) - num_logits, num_logits))
