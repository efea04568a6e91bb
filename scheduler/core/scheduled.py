"""A step's scheduled rows: each request's tokens to compute (and draft slots), and the same as columns."""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter

import numpy as np

from scheduler.core.progress import Progress
from scheduler.core.request import Request


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens to compute, a placeholder among them (drafts not counted)
    num_spec_slots: int = 0  # KV slots reserved for draft tokens to verify this step
    draft_token_ids: list[int] = field(default_factory=list)  # filled by the proposer, at most num_spec_slots
    # Whether this step reaches the end of the tokens (placeholders included), so the next one is sampled.
    # Fixed when scheduled (the engine advances num_computed_tokens afterwards): None works it out.
    samples: bool | None = None

    def __post_init__(self) -> None:
        if self.samples is None:
            request = self.request
            self.samples = request.num_computed_tokens + self.num_new_tokens == request.num_tokens_with_placeholders


class ScheduledBatch(list):
    """A step's scheduled rows (ScheduledRequests), with their columns as arrays (columns()): each row's Progress
    slot, new tokens and whether it samples. The scheduler fills them where it schedules by array operations; a
    plain list of rows (one filtered from it) has them worked out when asked."""

    cols: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    requests: list[Request] | None = None  # each row's request, where the scheduler knows them at once


def columns(batch: list[ScheduledRequest], progress: Progress) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slots, new tokens, samples) of the rows: a ScheduledBatch's own, else read off the rows (by map and
    attrgetter: no Python frame a row); those of rows appended since, read off them."""
    cols = getattr(batch, "cols", None)
    done = len(cols[0]) if cols is not None else 0
    if cols is not None and done == len(batch):
        return cols
    rest = batch[done:]
    n = len(rest)
    more = (progress.slots_of(list(map(_REQUEST, rest))), np.fromiter(map(_NUM_NEW, rest), np.int64, n),
            np.fromiter(map(_SAMPLES, rest), bool, n))
    cols = more if cols is None else tuple(np.concatenate([a, b]) for a, b in zip(cols, more))
    if isinstance(batch, ScheduledBatch):
        batch.cols = cols
    return cols


def batch_requests(batch: list[ScheduledRequest]) -> list[Request]:
    """Each row's request."""
    requests = getattr(batch, "requests", None)
    if requests is None:
        return list(map(_REQUEST, batch))
    if len(requests) < len(batch):
        requests = requests + list(map(_REQUEST, batch[len(requests):]))
        batch.requests = requests
    return requests


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=ScheduledBatch)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        scheduled = self.scheduled
        cols = getattr(scheduled, "cols", None)
        if cols is not None and len(cols[1]) == len(scheduled) and not any(map(_SPEC_SLOTS, scheduled)):
            return int(cols[1].sum())
        # map and attrgetter: no Python frame a row
        return sum(map(_NUM_NEW, scheduled)) + sum(map(len, map(_DRAFTS, scheduled)))


_REQUEST, _NUM_NEW, _SAMPLES = attrgetter("request"), attrgetter("num_new_tokens"), attrgetter("samples")
_SPEC_SLOTS, _DRAFTS = attrgetter("num_spec_slots"), attrgetter("draft_token_ids")
