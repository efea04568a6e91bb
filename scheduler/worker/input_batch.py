"""The persistent batch: per-row state of the sequences holding KV blocks, kept across steps in preallocated arrays
and changed only where a sequence joins (its first blocks), grows (a new block), or leaves (finished or preempted:
its blocks freed). A step's inputs are gathered from these rows by vector operations (StepInputs), not rebuilt from
each request's block list every step."""

from __future__ import annotations

import numpy as np


class InputBatch:
    """Rows of block tables, one per sequence holding blocks, by the sequence's id. A freed row is reused by the
    next sequence to join; the arrays double when more rows or wider tables are needed."""

    def __init__(self, num_rows: int = 256, width: int = 64):
        self.block_tables = np.zeros((num_rows, width), dtype=np.int32)
        self.num_blocks = np.zeros(num_rows, dtype=np.int64)
        # Full blocks the prefix cache was last asked to take for the row: it is asked again once more filled.
        self.num_cached_blocks = np.zeros(num_rows, dtype=np.int64)
        self.row_of: dict[str, int] = {}
        self.num_syncs = 0  # syncs so far: a follower of row_of knows whether it saw them all
        self._free_rows = list(range(num_rows - 1, -1, -1))  # popped from the end: lowest rows first

    @property
    def num_rows(self) -> int:
        return len(self.num_blocks)

    def sync(self, released: list[str], grown: list[str], block_ids: dict[str, list[int]]) -> None:
        """Apply what changed since the last sync (BlockPool.take_row_changes): the sequences whose blocks were
        freed leave, those whose block lists grew (joining or not) get the new ids, read from block_ids (by sequence
        id). A sequence freed and given blocks again since leaves and joins again."""
        self.num_syncs += 1
        for seq_id in released:
            row = self.row_of.pop(seq_id, None)
            if row is not None:
                self.num_blocks[row] = 0
                self._free_rows.append(row)
        for seq_id in grown:
            ids = block_ids.get(seq_id)
            if ids is None:
                continue  # freed again since it grew
            row = self.row_of.get(seq_id)
            if row is None:
                row = self._join(seq_id)
            have, count = int(self.num_blocks[row]), len(ids)
            if count > self.block_tables.shape[1]:
                self._widen(count)
            self.block_tables[row, have:count] = ids[have:]  # a sequence's block list only grows while held
            self.num_blocks[row] = count

    def rows(self, seq_ids) -> np.ndarray:
        """The rows of these sequences (each must hold blocks), in order."""
        return np.fromiter(map(self.row_of.__getitem__, seq_ids), np.int64)

    def tables(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(block tables [len(rows), widest of them], block counts) of these rows."""
        num_blocks = self.num_blocks[rows]
        width = int(num_blocks.max()) if len(rows) else 0
        return self.block_tables[:, :width][rows], num_blocks

    def _join(self, seq_id: str) -> int:
        if not self._free_rows:
            old = self.num_rows
            self.block_tables = np.concatenate([self.block_tables, np.zeros_like(self.block_tables)])
            self.num_blocks = np.concatenate([self.num_blocks, np.zeros_like(self.num_blocks)])
            self.num_cached_blocks = np.concatenate([self.num_cached_blocks, np.zeros_like(self.num_cached_blocks)])
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        row = self._free_rows.pop()
        self.row_of[seq_id] = row
        self.num_cached_blocks[row] = 0
        return row

    def _widen(self, width: int) -> None:
        wider = np.zeros((self.num_rows, max(width, 2 * self.block_tables.shape[1])), dtype=self.block_tables.dtype)
        wider[:, :self.block_tables.shape[1]] = self.block_tables
        self.block_tables = wider
