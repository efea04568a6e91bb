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


def fill_block_tables(tables: np.ndarray, items: list[ForwardItem]) -> None:
    """Row i of tables starts with items[i]'s block ids (the rest of the row is left as it is): one fill of every
    row's ids laid end to end, not a numpy assignment a row."""
    count = len(items)
    lens = np.fromiter((len(it.block_table) for it in items), np.int64, count)
    ids = np.fromiter(itertools.chain.from_iterable(it.block_table for it in items), np.int64, int(lens.sum()))
    rows = tables[:count]
    rows[np.arange(tables.shape[1]) < lens[:, None]] = ids  # row-major: each row's ids in order


def positions_and_slots(query_lens, query_start_loc, starts, block_tables, block_size: int):
    """Each new token's position in its sequence and its KV-cache slot, tokens laid end to end."""
    seq_of_token = np.repeat(np.arange(len(query_lens)), query_lens)
    positions = np.arange(query_start_loc[len(query_lens)]) - query_start_loc[seq_of_token] + starts[seq_of_token]
    slots = block_tables[seq_of_token, positions // block_size] * block_size + positions % block_size
    return positions, slots


def device_token_patch(items: list[ForwardItem], row_width: int) -> np.ndarray | None:
    """[2, n]: where in the packed input ids each device-held token goes, and its index in the
    flattened device_tokens; None when no item has any."""
    count = len(items)
    num_device = np.fromiter((it.num_device_tokens for it in items), np.int64, count)
    total = int(num_device.sum())
    if not total:
        return None
    ends = np.cumsum(np.fromiter((len(it.token_ids) for it in items), np.int64, count))
    rows = np.fromiter((it.device_row for it in items), np.int64, count)
    within = np.arange(total) - np.repeat(np.cumsum(num_device) - num_device, num_device)  # 0.. n-1 in each item
    dest = np.repeat(ends - num_device, num_device) + within
    src = np.repeat(rows * row_width, num_device) + within
    return np.stack([dest, src])


def logits_indices(query_lens: np.ndarray, num_logits: np.ndarray) -> np.ndarray:
    """Rows of each sequence's last num_logits tokens, sequences laid end to end."""
    ends = np.cumsum(query_lens)
    return np.repeat(ends - num_logits, num_logits) + (
        np.arange(num_logits.sum()) - np.repeat(np.cumsum(num_logits) - num_logits, num_logits))
