"""A step's inputs from the persistent batch (scheduler/worker/input_batch.py): the scheduled requests' rows
gathered by vector operations, and the prefix cache told only of the rows that filled a block."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from operator import attrgetter

import numpy as np

from scheduler.core.kv_cache import BlockPool
from scheduler.core.request import Request
from scheduler.core.scheduler import ScheduledRequest
from scheduler.worker.input_batch import InputBatch
from scheduler.worker.packing import StepInputs


@dataclass(slots=True)
class Gathered:
    inputs: StepInputs
    rows: np.ndarray  # each sequence's row in the persistent batch
    lengths: np.ndarray  # the tokens the host knows of each sequence


class RowInputs:
    """The persistent batch kept in step with the block pool: rows join, grow and leave as the pool's block lists
    do (BlockPool.take_row_changes), once a step."""

    def __init__(self, pool: BlockPool, num_rows: int):
        self.pool = pool
        self.batch = InputBatch(num_rows)

    def gather(self, batch: list[ScheduledRequest], device_rows: dict[Request, int]) -> Gathered:
        """The step's inputs for rows without drafts or prompt logprobs: block tables from the persistent batch's
        rows, tokens from the requests only where the host knows them (a placeholder's is row device_rows[request]
        of the step in flight's tokens)."""
        self.batch.sync(*self.pool.take_row_changes(), self.pool.req_block_ids)
        # Each column read by map and attrgetter: a pass over the rows without a Python frame a row.
        n = len(batch)
        requests = list(map(_REQUEST, batch))
        query_lens = np.fromiter(map(_NUM_NEW, batch), np.int64, n)
        starts = np.fromiter(map(_NUM_COMPUTED, requests), np.int64, n)
        num_logits = np.fromiter(map(_SAMPLES, batch), np.int64, n)
        lengths = np.fromiter(map(len, map(_TOKENS, requests)), np.int64, n)
        known = np.clip(lengths - starts, 0, query_lens)
        token_ids = np.zeros(int(query_lens.sum()), dtype=np.int64)
        if known.any():
            pick = np.flatnonzero(known)
            counts = known[pick]
            values = np.fromiter(itertools.chain.from_iterable(
                requests[i].all_token_ids[start:start + count] for i, start, count
                in zip(pick.tolist(), starts[pick].tolist(), counts.tolist())), np.int64, int(counts.sum()))
            firsts = (np.cumsum(query_lens) - query_lens)[pick]
            token_ids[np.repeat(firsts, counts) + (np.arange(len(values)) - np.repeat(np.cumsum(counts) - counts,
                                                                                      counts))] = values
        num_device = query_lens - known  # placeholders: tokens of the step in flight
        on_device = np.fromiter(map(device_rows.get, requests, itertools.repeat(-1, n)), np.int64, n) \
            if device_rows else np.full(n, -1, dtype=np.int64)
        assert not ((num_device > 0) & (on_device < 0)).any(), "a placeholder's token is on the device"
        rows = self.batch.rows(map(_SEQ_ID, requests))
        tables, num_blocks = self.batch.tables(rows)
        inputs = StepInputs(query_lens, starts, num_logits, token_ids, tables, num_blocks, on_device,
                            np.where(on_device >= 0, num_device, 0))
        return Gathered(inputs, rows, lengths)

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
            self.pool.cache_filled_blocks([batch[i].request for i in filled.tolist()])
            looked[rows[filled]] = blocks[filled]


_REQUEST, _NUM_NEW, _SAMPLES = attrgetter("request"), attrgetter("num_new_tokens"), attrgetter("samples")
_NUM_COMPUTED, _TOKENS = attrgetter("num_computed_tokens"), attrgetter("all_token_ids")
_SEQ_ID = attrgetter("request_id")
