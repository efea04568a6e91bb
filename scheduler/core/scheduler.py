"""Iteration-level scheduling: every step, one token budget shared by every active sequence.

There is no prefill phase or decode phase. A step's output says how many tokens of each
request to compute; a decode is one token, a prompt (or a prompt resumed after preemption)
is as many as the budget allows, spread over steps when it does not fit (chunked prefill).

The scheduler is also the one writer of request progress: it admits and preempts (num_computed_tokens), counts a
launched step's tokens as computed (advance), and applies what a step sampled or verified (update_from_output):
tokens, accepted drafts and the placeholders of tokens still on the device.

A paused request (its reader is far behind: Request.paused) is not scheduled; it keeps its blocks until they
are needed, and is the first preempted when they are.
"""

from __future__ import annotations

import time
from bisect import insort
from operator import attrgetter

from scheduler.core.kv_cache import BlockPool
from scheduler.core.progress import Progress
from scheduler.core.request import Request, RequestStatus
from scheduler.core.running_pass import RunningRows, schedule_all
from scheduler.core.scheduled import ScheduledBatch, ScheduledRequest, SchedulerOutput, batch_requests, columns
from scheduler.core.step_output import PlainTokens, StepOutput, StepResult, apply_rows, apply_tokens

__all__ = ["PlainTokens", "ScheduledBatch", "ScheduledRequest", "Scheduler", "SchedulerOutput", "StepOutput",
           "StepResult", "batch_requests", "columns"]


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_batched_tokens: int, max_num_seqs: int,
                 priority_aging_s: float = 10.0):
        """priority_aging_s: every this many seconds of waiting lowers a request's priority
        value by one, so low-priority work is never starved."""
        assert max_num_batched_tokens > 0 and max_num_seqs > 0
        self.pool = pool
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.priority_aging_s = priority_aging_s
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        # Whether running may be out of _order: a request joined it, or one was paused last step (and may have
        # resumed since). Otherwise it is in rank order, and sorted again only when a paused request turns up.
        self._unsorted = False
        # A decoding row (one token, no drafts, sampled) is the same every step: its ScheduledRequest is made once
        # and scheduled again, not made again each step (by sequence id; dropped when the request leaves running).
        self._decode_rows: dict[str, ScheduledRequest] = {}
        # Each request's progress in arrays, by slot (progress.py); running's columns, rebuilt when it changes.
        self.progress = Progress(max(256, max_num_seqs))
        self._rows: RunningRows | None = None
        self._by_rank = False  # running is in rank order and none of it was paused at the last look
        self._waiting_by_rank = True  # waiting is in rank order (none of it joined since it was sorted so)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        request.rank = self._rank(request)  # fixed while it is queued or running: worked out once
        self.progress.join(request)
        self._held(request)  # a forked completion holds its prompt's shared blocks already
        self.waiting.append(request)
        self._waiting_by_rank = False

    def finish(self, request: Request) -> None:
        """Remove a request however it ended, returning its blocks."""
        self._decode_rows.pop(request.request_id, None)
        if request in self.running:
            self.running.remove(request)
            self._rows = None
        elif request in self.waiting:
            self.waiting.remove(request)
        self.pool.free(request)
        self.progress.leave(request)
        request.status = RequestStatus.FINISHED

    def advance(self, batch: list[ScheduledRequest]) -> None:
        """A step over batch is launched: its new tokens count as computed (KV of rejected drafts is not counted:
        update_from_output counts the accepted ones)."""
        slots, num_new, _ = columns(batch, self.progress)
        self.progress.computed[slots] += num_new

    def add_placeholders(self, requests: list[Request], slots=None) -> None:
        """Each of these requests (at these Progress slots, where known) has a token sampled that only the device
        knows yet: it counts as a placeholder until the step's output is applied."""
        self.progress.placeholders[slots if slots is not None else self.progress.slots_of(requests)] += 1

    def update_from_output(self, out: StepOutput) -> list[StepResult] | PlainTokens:
        """Apply a step's output: the one place a step's tokens reach their requests. A request that has ended
        since the step was launched (a stop in the step before, an abort) takes none: never an extra token.
        Accepted drafts join the output and their KV (computed in the verification pass) counts as computed;
        a sampled token also advances its grammar (a verified request's grammar was settled by verification).
        A step of one token a row with nothing else to report is applied by array operations (PlainTokens)."""
        assert not out.applied, "a step's output is applied once"
        out.applied = True
        if out.drafts is None and out.logprobs is None:
            if out.slots is None:
                out.slots = self.progress.slots_of(out.requests)
            results = apply_tokens(self.progress, out) if out.slots is not None else apply_rows(out)
        else:
            results = apply_rows(out)
        self.progress.release_retired()  # the ended requests this step carried are past: their slots are free
        return results

    def num_decodes_ahead(self) -> tuple[int, bool]:
        """(running sequences with one token to compute, whether any has more: a prompt still to compute)."""
        slots = self.progress.slots_of(self.running)
        p = self.progress
        need = p.tokens[slots] + p.placeholders[slots] - p.computed[slots]
        return int((need == 1).sum()), bool((need > 1).any())

    def num_prompt_tokens(self, batch: list[ScheduledRequest]) -> int:
        """Prompt tokens a batch computes (recomputation after preemption included)."""
        if not len(batch):
            return 0
        slots, num_new, _ = columns(batch, self.progress)
        return int(num_new[self.progress.computed[slots] < self.progress.prompt[slots]].sum())

    def schedule(self, spec_depth: int = 0) -> SchedulerOutput:
        """spec_depth: how many draft tokens a decoding request may verify this step (each request
        caps it: Request.draft_depth)."""
        now = time.monotonic()
        out = SchedulerOutput()
        budget = self._schedule_running(out, spec_depth)
        if not out.preempted:
            self._schedule_waiting(out, budget, now)
        return out

    def _allocate(self, request: Request, num_tokens: int, cached_prefix=()) -> bool:
        """BlockPool.allocate, the request's capacity noted in its slot."""
        if not self.pool.allocate(request, num_tokens, cached_prefix):
            return False
        self._held(request)
        return True

    def _held(self, request: Request) -> None:
        """Note in the request's Progress slot the tokens its blocks take, after the pool gave or took some."""
        held = self.pool.req_block_ids.get(request.request_id)
        self.progress.capacity[request._slot] = len(held) * self.pool.block_size if held is not None else 0

    def _rank(self, request: Request) -> tuple[float, float]:
        """(priority value - age / priority_aging_s, arrival): the age's `now` is common to every request, so it is
        left out and a request's rank does not change while it waits (add() sets it once). _order puts paused
        requests after it."""
        aging = request.arrival_time / self.priority_aging_s if self.priority_aging_s > 0 else 0.0
        return (request.priority + aging, request.arrival_time)

    def _schedule_running(self, out: SchedulerOutput, spec_depth: int) -> int:
        """Every running request at once by array operations where none can go short (schedule_all), else one
        by one in rank order, preempting the lowest-ranked where blocks run out."""
        sorted_now = self._unsorted and bool(self.running)
        if sorted_now:
            self.running.sort(key=_order)
            self._unsorted, self._rows = False, None
        if self._rows is None:
            self._rows = RunningRows(self.running, self._decode_rows, self.progress)
        budget = schedule_all(self, self._rows, out, spec_depth)
        self._by_rank = budget is not None
        if budget is not None:
            return budget
        self._rows = None  # the pass below may preempt, sort or allocate
        return self._schedule_one_by_one(out, spec_depth, sorted_now)

    def _schedule_one_by_one(self, out: SchedulerOutput, spec_depth: int, sorted_now: bool) -> int:
        budget = self.max_num_batched_tokens
        self._unsorted = False
        block_ids, block_size, scheduled = self.pool.req_block_ids, self.pool.block_size, out.scheduled
        decode_rows = self._decode_rows
        # The rows' progress as lists: what a row reads below changes only for the rows already passed (or
        # preempted), so one copy serves the pass.
        progress = self.progress
        computed, known = progress.computed.tolist(), progress.tokens.tolist()
        placeholders, in_flight = progress.placeholders.tolist(), progress.drafts_in_flight.tolist()
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.stream is not None and request.stream.paused:  # Request.paused, without a call a row
                self._unsorted = True  # it may resume before the next step
                if not sorted_now:  # those before it are the first in rank order, and stay first when sorted
                    sorted_now = True
                    self.running.sort(key=_order)
                    continue
                break  # so are all after it
            slot = request._slot
            num_tokens = known[slot] + placeholders[slot]  # num_tokens_with_placeholders
            num_computed = computed[slot]
            if 0 < request.max_total_tokens <= num_tokens:
                i += 1  # its last token is in flight, or not checked for a stop yet: nothing is left to compute
                continue
            # A step in flight may have accepted drafts the host does not know of yet: room for those too.
            reserve = in_flight[slot]
            if not spec_depth and num_tokens - num_computed == 1 \
                    and len(block_ids.get(request.request_id, ())) * block_size >= num_tokens + reserve:
                # Most rows of a decode step: one token, in a block it already holds (BlockPool.has_room).
                row = decode_rows.get(request.request_id)
                if row is None:
                    row = decode_rows[request.request_id] = ScheduledRequest(request, 1, samples=True)
                scheduled.append(row)
                budget -= 1
                i += 1
                continue
            # A placeholder (a token sampled in the step in flight) is computed like a known token: KV space is
            # allocated for it, and its id comes from the device.
            num_new = min(num_tokens - num_computed, budget)
            decoding = num_tokens - num_computed == 1
            num_spec = min(request.draft_depth(spec_depth), budget - num_new) if decoding and spec_depth else 0
            needed = num_computed + num_new + reserve
            if num_spec and not self.pool.allocate(request, needed + num_spec):
                num_spec = 0  # speculation never costs another request its blocks
            while not self._allocate(request, needed):
                if not sorted_now:  # paused requests last, to go first; this one and those before it stay put
                    sorted_now = True
                    self.running.sort(key=_order)
                # Lowest priority, latest arrival; never one already scheduled, as those rank higher.
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, num_new, num_spec,
                                                      samples=num_new == num_tokens - num_computed))
                budget -= num_new + num_spec
                i += 1
        if i < len(self.running):
            self._unsorted = True  # paused requests may be among those not reached: sorted again next step
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, now: float) -> None:
        self._sort_waiting()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if request.paused or request in out.preempted:
                break  # so are all after it (one preempted here may have a step in flight, and may resume meanwhile)
            assert not request.num_placeholders, "a preempted request's step in flight ends before it is admitted"
            # A forked completion already holds its prompt's shared blocks; any other request looks in the cache,
            # but for one collecting prompt logprobs, which need the logits of every prompt position.
            num_cached = self.pool.num_held_tokens(request)
            cached = [] if num_cached or request.needs_prompt_logprobs else self.pool.find_cached_prefix(request)
            num_cached = num_cached or len(cached) * self.pool.block_size
            num_new = min(request.num_tokens - num_cached, budget)
            if not self._allocate(request, num_cached + num_new, cached):
                if not self._preempt_paused(out):
                    break
                continue  # the freed blocks may be cached ones it can share: look again
            self.waiting.pop(0)
            request.num_computed_tokens = num_cached
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
                request.num_cached_tokens = self.progress.cached[request._slot] = num_cached
            request.status = RequestStatus.RUNNING
            if self._by_rank:  # where sorting would put it: the rest stays in order
                insort(self.running, request, key=_RANK)
            else:
                self.running.append(request)
                self._unsorted = True
            self._rows = None
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new

    def _sort_waiting(self) -> None:
        """waiting in _order: by rank alone (a C-level key) while none of it is paused, and only when a request
        joined it since it was last sorted so."""
        if any(map(_PAUSED, filter(None, map(_STREAM, self.waiting)))):  # by map and filter: C-level passes
            self.waiting.sort(key=_order)
            self._waiting_by_rank = False
        elif not self._waiting_by_rank:
            self.waiting.sort(key=_RANK)
            self._waiting_by_rank = True

    def _preempt_paused(self, out: SchedulerOutput) -> bool:
        """Free the blocks of the lowest-ranked paused request, if one holds any."""
        victim = next((r for r in reversed(self.running) if r.paused), None)
        if victim is None:
            return False
        self.running.remove(victim)
        self._rows = None
        self._preempt(victim)
        out.preempted.append(victim)
        return True

    def _preempt(self, request: Request) -> None:
        """Free the blocks now and recompute later (prompt plus what was generated)."""
        self.pool.free(request)
        self._held(request)
        self._decode_rows.pop(request.request_id, None)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self._waiting_by_rank = False


def _order(request: Request) -> tuple[bool, tuple[float, float]]:
    """How the scheduler sorts: paused requests (their readers far behind) last, so they are skipped together and
    preempted first; the rest by rank (Scheduler._rank, set when queued)."""
    stream = request.stream
    return stream is not None and stream.paused, request.rank


_RANK, _STREAM, _PAUSED = attrgetter("rank"), attrgetter("stream"), attrgetter("paused")
