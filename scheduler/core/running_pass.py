"""The scheduler's pass over its running requests as array operations: every row's tokens to compute, draft slots
and KV blocks worked out at once from the Progress arrays, with a Python loop over only the rows that need a new
block (a decoding row: one step in block_size). It runs where no row can go short (no reader behind, the whole
step within the token budget, every block needed free); otherwise the scheduler goes one row at a time, in rank
order, preempting where blocks run out (Scheduler._schedule_one_by_one), and gives the same rows in the cases
both take."""

from __future__ import annotations

from itertools import compress
from operator import attrgetter
from typing import TYPE_CHECKING

import numpy as np

from scheduler.core.progress import Progress
from scheduler.core.request import Request
from scheduler.core.scheduled import ScheduledBatch, ScheduledRequest, SchedulerOutput

if TYPE_CHECKING:
    from scheduler.core.scheduler import Scheduler


class _NoStream:
    paused = False


class RunningRows:
    """The running requests' columns, made when running changes (a request joins, leaves or is resorted): their
    slots, their streams (whose readers may pause them) and their decode rows (a ScheduledRequest of one token,
    made once per request and scheduled again every step)."""

    def __init__(self, running: list[Request], decode_rows: dict[str, ScheduledRequest], progress: Progress):
        self.requests = list(running)
        self.slots = progress.slots_of(self.requests)
        streams = list(map(_STREAM, self.requests))
        self.streams = [s if s is not None else _NO_STREAM for s in streams] if None in streams else streams
        rows = list(map(decode_rows.get, map(_ID, self.requests)))
        if None in rows:
            for i, request in enumerate(self.requests):
                if rows[i] is None:
                    rows[i] = decode_rows[request.request_id] = ScheduledRequest(request, 1, samples=True)
        self.decode_rows = rows


def schedule_all(scheduler: Scheduler, rows: RunningRows, out: SchedulerOutput, spec_depth: int) -> int | None:
    """Schedule every running request at once onto out.scheduled, each for all its tokens to compute (and, when
    spec_depth, its draft slots), allocating the blocks that takes. Returns the token budget left, or None where
    this pass does not apply (nothing scheduled, nothing allocated)."""
    if not rows.requests or any(map(_PAUSED, rows.streams)):
        return None
    p, slots = scheduler.progress, rows.slots
    computed, total = p.computed[slots], p.tokens[slots] + p.placeholders[slots]
    need, max_total, reserve = total - computed, p.max_total[slots], p.drafts_in_flight[slots]
    # A request whose last token is in flight (or not checked for a stop yet) has nothing left to compute.
    active = (max_total <= 0) | (total < max_total)
    if not active.any() or need[active].min() < 1:
        return None
    spec = np.zeros_like(need)
    if spec_depth:  # Request.draft_depth of every decoding row
        cap = p.draft_cap[slots]
        depth = np.where(cap < 0, spec_depth, np.minimum(cap, spec_depth))
        spec = np.where(active & (need == 1), np.maximum(0, np.minimum(depth, max_total - total - reserve)), 0)
    num_tokens = int(need[active].sum() + spec.sum())
    if num_tokens > scheduler.max_num_batched_tokens:
        return None
    # A step in flight may have accepted drafts the host does not know of yet: room for those too.
    wanted = computed + need + reserve + spec
    short = np.flatnonzero(active & (p.capacity[slots] < wanted))
    if len(short):
        pool, short_slots = scheduler.pool, slots[short]
        bs = pool.block_size
        num_blocks = -(-wanted[short] // bs) - p.capacity[short_slots] // bs
        if int(num_blocks.sum()) > pool.num_free_blocks:
            return None
        pool.grow([rows.requests[i] for i in short.tolist()], num_blocks.tolist())
        p.capacity[short_slots] += num_blocks * bs
    decode = active & (need == 1) & (spec == 0)
    if (decode == active).all():  # most steps: every row a decode, each in its own reused row
        batch = ScheduledBatch(rows.decode_rows if active.all() else compress(rows.decode_rows, active))
    else:
        batch = ScheduledBatch(rows.decode_rows[i] if decode[i] else ScheduledRequest(
            rows.requests[i], n, k, samples=True) for i, n, k in zip(np.flatnonzero(active).tolist(),
                                                                      need[active].tolist(), spec[active].tolist()))
    batch.requests = rows.requests if active.all() else list(compress(rows.requests, active))
    batch.cols = (slots[active], need[active], np.ones(len(batch), dtype=bool))
    out.scheduled = batch
    return scheduler.max_num_batched_tokens - num_tokens


_PAUSED, _STREAM, _ID = attrgetter("paused"), attrgetter("stream"), attrgetter("request_id")
_NO_STREAM = _NoStream()
