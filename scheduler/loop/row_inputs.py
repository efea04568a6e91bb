"""A step's inputs from the persistent batch (scheduler/worker/input_batch.py): the scheduled requests' rows
gathered by vector operations, and the prefix cache told only of the rows that filled a block."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from scheduler.core.kv_cache import BlockPool
from scheduler.core.progress import Progress
from scheduler.core.request import Request
from scheduler.core.scheduler import ScheduledRequest, batch_requests, columns
from scheduler.worker.input_batch import InputBatch
from scheduler.worker.packing import StepInputs


@dataclass(slots=True)
class Gathered:
    inputs: StepInputs
    rows: np.ndarray  # each sequence's row in the persistent batch
    lengths: np.ndarray  # the tokens the host knows of each sequence
    requests: list[Request]


class RowInputs:
    """The persistent batch kept in step with the block pool: rows join, grow and leave as the pool's block lists
    do (BlockPool.take_row_changes), once a step. What a row's request has computed and knows is read from the
    scheduler's Progress arrays."""

    def __init__(self, pool: BlockPool, num_rows: int, progress: Progress):
        self.pool = pool
        self.progress = progress
        self.batch = InputBatch(num_rows)
        # Each Progress slot's row in the persistent batch, set as the slot's request joins a row (rows change only
        # then): a step's rows are one array lookup, not a dictionary lookup a row.
        self.row_of_slot = np.zeros(progress.num_slots, dtype=np.int64)
        self._num_syncs = 0

    def gather(self, batch: list[ScheduledRequest], device_rows: dict[Request, int] | None = None,
               device_slots: np.ndarray | None = None) -> Gathered:
        """The step's inputs for rows without drafts or prompt logprobs: block tables from the persistent batch's
        rows, tokens from the requests only where the host knows them; a placeholder's is the step in flight's
        token of row device_rows[request], or (device_slots: the step in flight's rows' Progress slots) of the
        row holding the request's slot."""
        progress = self.progress
        released, grown = self.pool.take_row_changes()
        missed = self.batch.num_syncs != self._num_syncs  # someone else synced the batch since the last look
        self.batch.sync(released, grown, self.pool.req_block_ids)
        self._num_syncs = self.batch.num_syncs
        self._follow_rows(list(self.batch.row_of) if missed else grown)
        slots, query_lens, num_logits = columns(batch, progress)
        num_logits = num_logits.astype(np.int64)
        requests = batch_requests(batch)
        n = len(batch)
        starts, lengths = progress.computed[slots], progress.tokens[slots]
        known = np.clip(lengths - starts, 0, query_lens)
        token_ids = np.zeros(int(query_lens.sum()), dtype=np.int64)
        if known.any():
            _fill_known(token_ids, requests, query_lens, starts, lengths, known, progress.last[slots])
        num_device = query_lens - known  # placeholders: tokens of the step in flight
        if device_slots is not None:
            where = np.full(progress.num_slots, -1, dtype=np.int64)
            where[device_slots] = np.arange(len(device_slots))
            on_device = where[slots]
        elif device_rows:
            on_device = np.fromiter(map(device_rows.get, requests, itertools.repeat(-1, n)), np.int64, n)
        else:
            on_device = np.full(n, -1, dtype=np.int64)
        assert not ((num_device > 0) & (on_device < 0)).any(), "a placeholder's token is on the device"
        rows = self.row_of_slot[slots]
        tables, num_blocks = self.batch.tables(rows)
        inputs = StepInputs(query_lens, starts, num_logits, token_ids, tables, num_blocks, on_device,
                            np.where(on_device >= 0, num_device, 0))
        return Gathered(inputs, rows, lengths, requests)

    def _follow_rows(self, grown: list[str]) -> None:
        """Note the rows of the slots whose requests joined (or grew in) the persistent batch."""
        if len(self.row_of_slot) < self.progress.num_slots:
            wider = np.zeros(self.progress.num_slots, dtype=np.int64)
            wider[:len(self.row_of_slot)] = self.row_of_slot
            self.row_of_slot = wider
        slot_of, row_of = self.progress.slot_of, self.batch.row_of
        for seq_id in grown:
            slot, row = slot_of.get(seq_id), row_of.get(seq_id)
            if slot is not None and row is not None:
                self.row_of_slot[slot] = row

    def cache_filled_blocks(self, batch: list[ScheduledRequest], gathered: Gathered) -> None:
        """BlockPool.cache_filled_blocks for a launched step's gathered rows, once the step is counted as computed:
        only the rows that filled a block since their last look (a decode row fills one every block_size steps)
        reach the pool."""
        if not self.pool.enable_prefix_caching:
            return
        inputs, rows = gathered.inputs, gathered.rows
        # What the pool caches: up to the tokens computed (this step's included) and known.
        blocks = np.minimum(inputs.starts + inputs.query_lens, gathered.lengths) // self.pool.block_size
        looked = self.batch.num_cached_blocks
        filled = np.flatnonzero(blocks > looked[rows])
        if len(filled):
            # The rows' tokens known and computed, as BlockPool.cache_filled_blocks reads them off each request.
            requests, bs, cache = gathered.requests, self.pool.block_size, self.pool.cache_full_blocks
            for i, num_blocks in zip(filled.tolist(), blocks[filled].tolist()):
                cache(requests[i], num_blocks * bs)
            looked[rows[filled]] = blocks[filled]


def _fill_known(token_ids: np.ndarray, requests: list[Request], query_lens: np.ndarray, starts: np.ndarray,
                lengths: np.ndarray, known: np.ndarray, last: np.ndarray) -> None:
    """Write the tokens the host knows into the step's token ids (each row's run starts where its new tokens do)."""
    pick = np.flatnonzero(known)
    counts = known[pick]
    firsts = (np.cumsum(query_lens) - query_lens)[pick]
    if (counts == 1).all() and (starts[pick] == lengths[pick] - 1).all():
        token_ids[firsts] = last[pick]  # decoding rows of a synchronous step: each one's last token
        return
    picked = requests if len(pick) == len(requests) else [requests[i] for i in pick.tolist()]
    values = np.fromiter(itertools.chain.from_iterable(
        r.all_token_ids[start:start + count] for r, start, count
        in zip(picked, starts[pick].tolist(), counts.tolist())), np.int64, int(counts.sum()))
    token_ids[np.repeat(firsts, counts) + (np.arange(len(values)) - np.repeat(np.cumsum(counts) - counts,
                                                                              counts))] = values


