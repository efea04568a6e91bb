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
from dataclasses import dataclass, field
from operator import attrgetter

from scheduler.core.kv_cache import BlockPool
from scheduler.core.request import Request, RequestStatus


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


@dataclass(slots=True)
class StepResult:
    """A request's new tokens from one step, already on the request, for the engine's stop checks and outputs."""

    request: Request
    new_token_ids: list[int]
    logprobs: list | None  # a TokenLogprob for each new token, where the request asks
    num_drafts: int = 0
    num_accepted: int = 0


@dataclass(slots=True)
class StepOutput:
    """What one step sampled or verified, row by row, before any of it is on the requests: row i is requests[i]'s.
    token_ids[i] is its sampled token (after verification: the token that follows the accepted drafts);
    drafts[i] and num_accepted[i] its verified drafts and how many were accepted (None: a step without
    verification); logprobs[i] the TokenLogprobs of its new tokens (None: nobody asked). in_flight: a launched
    step's, whose rows stood as placeholders until now. Scheduler.update_from_output applies it, once."""

    requests: list[Request]
    token_ids: list[int]
    logprobs: list | None = None
    drafts: list[list[int]] | None = None
    num_accepted: list[int] | None = None
    in_flight: bool = False
    applied: bool = False


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        scheduled = self.scheduled  # map and attrgetter: no Python frame a row
        return sum(map(attrgetter("num_new_tokens"), scheduled)) + sum(map(len, map(attrgetter("draft_token_ids"),
                                                                                   scheduled)))


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

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        request.rank = self._rank(request)  # fixed while it is queued or running: worked out once
        self.waiting.append(request)

    def finish(self, request: Request) -> None:
        """Remove a request however it ended, returning its blocks."""
        self._decode_rows.pop(request.request_id, None)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.pool.free(request)
        request.status = RequestStatus.FINISHED

    def advance(self, batch: list[ScheduledRequest]) -> None:
        """A step over batch is launched: its new tokens count as computed (KV of rejected drafts is not counted:
        update_from_output counts the accepted ones)."""
        for s in batch:
            s.request.num_computed_tokens += s.num_new_tokens

    @staticmethod
    def add_placeholders(requests: list[Request]) -> None:
        """Each of these requests has a token sampled that only the device knows yet: it counts as a placeholder
        until the step's output is applied."""
        for request in requests:
            request.num_placeholders += 1

    @staticmethod
    def update_from_output(out: StepOutput) -> list[StepResult]:
        """Apply a step's output: the one place a step's tokens reach their requests. A request that has ended
        since the step was launched (a stop in the step before, an abort) takes none: never an extra token.
        Accepted drafts join the output and their KV (computed in the verification pass) counts as computed;
        a sampled token also advances its grammar (a verified request's grammar was settled by verification)."""
        assert not out.applied, "a step's output is applied once"
        out.applied = True
        if out.drafts is None and out.logprobs is None:
            return _apply_tokens(out)
        results = []
        for i, (request, token) in enumerate(zip(out.requests, out.token_ids)):
            if out.in_flight:
                request.num_placeholders -= 1
            if request.is_finished:
                continue
            num_drafts = num_accepted = 0
            if out.drafts is None:
                new_tokens = [token]
                if request.guide is not None:
                    request.guide.accept(new_tokens)
            else:
                drafts, num_accepted = out.drafts[i], out.num_accepted[i]
                new_tokens, num_drafts = drafts[:num_accepted] + [token], len(drafts)
                if out.in_flight and not request.num_placeholders:
                    request.num_drafts_in_flight = 0  # no step of its own is in flight any more
                if request.status == RequestStatus.RUNNING:  # preempted meanwhile: all is computed again
                    request.num_computed_tokens += num_accepted
                request.num_draft_tokens += num_drafts
                request.num_accepted_tokens += num_accepted
            for token_id in new_tokens:
                request.append_token(token_id)
            logprobs = out.logprobs[i] if out.logprobs is not None and request.params.logprobs else None
            results.append(StepResult(request, new_tokens, logprobs, num_drafts, num_accepted))
        return results

    def schedule(self, spec_depth: int = 0) -> SchedulerOutput:
        """spec_depth: how many draft tokens a decoding request may verify this step (each request
        caps it: Request.draft_depth)."""
        now = time.monotonic()
        out = SchedulerOutput()
        budget = self._schedule_running(out, now, spec_depth)
        if not out.preempted:
            self._schedule_waiting(out, budget, now)
        return out

    def _rank(self, request: Request) -> tuple[float, float]:
        """(priority value - age / priority_aging_s, arrival): the age's `now` is common to every request, so it is
        left out and a request's rank does not change while it waits (add() sets it once). _order puts paused
        requests after it."""
        aging = request.arrival_time / self.priority_aging_s if self.priority_aging_s > 0 else 0.0
        return (request.priority + aging, request.arrival_time)

    def _schedule_running(self, out: SchedulerOutput, now: float, spec_depth: int) -> int:
        budget = self.max_num_batched_tokens
        sorted_now, self._unsorted = self._unsorted, False
        if sorted_now:
            self.running.sort(key=_order)
        block_ids, block_size, scheduled = self.pool.req_block_ids, self.pool.block_size, out.scheduled
        decode_rows = self._decode_rows
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
            num_tokens = len(request.all_token_ids) + request.num_placeholders  # num_tokens_with_placeholders
            if 0 < request.max_total_tokens <= num_tokens:
                i += 1  # its last token is in flight, or not checked for a stop yet: nothing is left to compute
                continue
            # A step in flight may have accepted drafts the host does not know of yet: room for those too.
            reserve = request.num_drafts_in_flight
            if not spec_depth and num_tokens - request.num_computed_tokens == 1 \
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
            num_new = min(num_tokens - request.num_computed_tokens, budget)
            decoding = num_tokens - request.num_computed_tokens == 1
            num_spec = min(request.draft_depth(spec_depth), budget - num_new) if decoding and spec_depth else 0
            needed = request.num_computed_tokens + num_new + reserve
            if num_spec and not self.pool.allocate(request, needed + num_spec):
                num_spec = 0  # speculation never costs another request its blocks
            while not self.pool.allocate(request, needed):
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
                out.scheduled.append(ScheduledRequest(request, num_new, num_spec, samples=num_new == num_tokens
                                                      - request.num_computed_tokens))
                budget -= num_new + num_spec
                i += 1
        if i < len(self.running):
            self._unsorted = True  # paused requests may be among those not reached: sorted again next step
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, now: float) -> None:
        self.waiting.sort(key=_order)
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
            if not self.pool.allocate(request, num_cached + num_new, cached):
                if not self._preempt_paused(out):
                    break
                continue  # the freed blocks may be cached ones it can share: look again
            self.waiting.pop(0)
            request.num_computed_tokens = num_cached
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._unsorted = True
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new

    def _preempt_paused(self, out: SchedulerOutput) -> bool:
        """Free the blocks of the lowest-ranked paused request, if one holds any."""
        victim = next((r for r in reversed(self.running) if r.paused), None)
        if victim is None:
            return False
        self.running.remove(victim)
        self._preempt(victim)
        out.preempted.append(victim)
        return True

    def _preempt(self, request: Request) -> None:
        """Free the blocks now and recompute later (prompt plus what was generated)."""
        self.pool.free(request)
        self._decode_rows.pop(request.request_id, None)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.append(request)


def _apply_tokens(out: StepOutput) -> list[StepResult]:
    """update_from_output for a step without verification or logprobs (most steps): one token a row."""
    results = []
    in_flight, finished = out.in_flight, RequestStatus.FINISHED
    for request, token in zip(out.requests, out.token_ids):
        if in_flight:
            request.num_placeholders -= 1
        if request.status is finished:  # Request.is_finished, without a call a row
            continue
        new_tokens = [token]
        if request.guide is not None:
            request.guide.accept(new_tokens)
        request.output_token_ids.append(token)
        request.all_token_ids.append(token)
        results.append(StepResult(request, new_tokens, None))
    return results


def _order(request: Request) -> tuple[bool, tuple[float, float]]:
    """How the scheduler sorts: paused requests (their readers far behind) last, so they are skipped together and
    preempted first; the rest by rank (Scheduler._rank, set when queued)."""
    stream = request.stream
    return stream is not None and stream.paused, request.rank
