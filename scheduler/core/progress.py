"""Request progress in arrays: each request in the scheduler has a slot, and what a step changes about it (tokens
computed, tokens known, placeholders and drafts in flight, the tokens its KV blocks take) lives at that slot, so a
step over a thousand rows is a few array operations and a Python loop over only the rows that need something.

The request reads and writes the same numbers through its properties (Request.num_computed_tokens, ...), so code
that looks at one request at a time sees no difference. A slot is the request's from Scheduler.add to its end; the
slot of an ended request is reused only once the step that may still carry it has been applied (release_retired).
"""

from __future__ import annotations

from operator import attrgetter

import numpy as np

from scheduler.core.params import has_penalty

# The per-slot integer columns; each has a twin attribute on a request outside the scheduler (Request._own).
COUNTS = ("computed", "placeholders", "drafts_in_flight", "sent")
PENDING_TOKENS = 32  # a step's tokens a slot holds before they go onto its request's list (Request.all_token_ids)


class Progress:
    """Arrays by slot. computed, placeholders, drafts_in_flight, sent: the request's own numbers (the truth while it
    holds the slot); tokens: len(all_token_ids); capacity: tokens its KV blocks take; the rest fixed when it joins."""

    def __init__(self, num_slots: int = 256):
        self.computed = np.zeros(num_slots, dtype=np.int64)
        self.placeholders = np.zeros(num_slots, dtype=np.int64)
        self.drafts_in_flight = np.zeros(num_slots, dtype=np.int64)
        self.sent = np.zeros(num_slots, dtype=np.int64)  # output tokens its stream has been told of
        self.tokens = np.zeros(num_slots, dtype=np.int64)
        self.last = np.zeros(num_slots, dtype=np.int64)  # the last token known
        # Tokens applied and not on the request's list yet: num_pending[slot] of them, in pending[slot].
        self.pending = np.zeros((num_slots, PENDING_TOKENS), dtype=np.int64)
        self.num_pending = np.zeros(num_slots, dtype=np.int64)
        self.capacity = np.zeros(num_slots, dtype=np.int64)
        self.max_total = np.zeros(num_slots, dtype=np.int64)
        self.prompt = np.zeros(num_slots, dtype=np.int64)
        self.draft_cap = np.zeros(num_slots, dtype=np.int64)  # max draft tokens: -1 uncapped, 0 never speculates
        self.finished = np.zeros(num_slots, dtype=bool)
        self.guided = np.zeros(num_slots, dtype=bool)  # a grammar constrains it
        self.argmax_always = np.zeros(num_slots, dtype=bool)  # Request.argmax_always
        self.synchronous = np.zeros(num_slots, dtype=bool)  # penalties or prompt logprobs: the host must keep up
        self.asks_prompt_logprobs = np.zeros(num_slots, dtype=bool)
        self.watched = np.zeros(num_slots, dtype=bool)  # every new token goes through the full stop check
        self.ends_on_eos = np.zeros(num_slots, dtype=bool)
        self.deltas = np.zeros(num_slots, dtype=bool)  # its stream is told after every step
        # How it samples, where its parameters alone decide (plain_sampling: no penalty, logit bias or min_tokens).
        self.plain_sampling = np.zeros(num_slots, dtype=bool)
        self.temperature = np.zeros(num_slots, dtype=np.float32)
        self.top_p = np.ones(num_slots, dtype=np.float32)
        self.min_p = np.zeros(num_slots, dtype=np.float32)
        self.top_k = np.zeros(num_slots, dtype=np.int64)
        self.num_logprobs = np.zeros(num_slots, dtype=np.int64)
        self.seeded = np.zeros(num_slots, dtype=bool)  # draws its noise from its own generator
        # What an output names (Request.output_id, index, num_cached_tokens) and the engine's handle, by slot: a
        # step's outputs are built without touching each request.
        self.output_ids: list[str] = [""] * num_slots
        self.handles: list = [None] * num_slots
        self.index = np.zeros(num_slots, dtype=np.int64)
        self.cached = np.zeros(num_slots, dtype=np.int64)
        self._free = list(range(num_slots - 1, -1, -1))  # popped from the end: lowest slots first
        self._retired: list[int] = []
        self.slot_of: dict[str, int] = {}  # by sequence id, while the request holds its slot

    @property
    def num_slots(self) -> int:
        return len(self.computed)

    def join(self, request) -> None:
        """Give the request a slot and move its numbers there."""
        if request._progress is not None:
            return
        if not self._free:
            self._grow()
        slot = self._free.pop()
        for name in COUNTS:
            getattr(self, name)[slot] = request._own[name]
        params = request.params
        self.tokens[slot] = len(request.all_token_ids)
        self.last[slot] = request.all_token_ids[-1] if request.all_token_ids else 0
        self.num_pending[slot] = 0
        self.capacity[slot] = 0
        self.max_total[slot] = request.max_total_tokens
        self.prompt[slot] = len(request.prompt_token_ids)
        self.draft_cap[slot] = (0 if not request.speculative else
                                -1 if request.max_draft_tokens is None else request.max_draft_tokens)
        self.finished[slot] = False
        self.guided[slot] = request.guide is not None
        self.argmax_always[slot] = request.argmax_always
        self.synchronous[slot] = has_penalty(params) or params.prompt_logprobs is not None
        self.asks_prompt_logprobs[slot] = params.prompt_logprobs is not None
        self.watched[slot] = request.host_checks
        self.ends_on_eos[slot] = not params.ignore_eos
        self.deltas[slot] = request.stream_deltas
        self.plain_sampling[slot] = not request.penalised and not params.logit_bias and not params.min_tokens
        self.temperature[slot], self.top_p[slot], self.min_p[slot] = params.temperature, params.top_p, params.min_p
        self.top_k[slot], self.num_logprobs[slot] = params.top_k, params.logprobs
        self.seeded[slot] = request.generator is not None and not params.greedy
        self.output_ids[slot], self.handles[slot] = request.output_id, request.handle
        self.index[slot], self.cached[slot] = request.index, request.num_cached_tokens
        request._progress, request._slot = self, slot
        self.slot_of[request.request_id] = slot

    def leave(self, request) -> None:
        """The request has ended: its numbers go back onto it, its slot is retired (release_retired frees it)."""
        slot = request._slot
        if request._progress is not self:
            return
        self.flush(request)
        for name in COUNTS:
            request._own[name] = int(getattr(self, name)[slot])
        request._progress = None  # its _slot stays: the step that may still carry it finds the slot finished
        del self.slot_of[request.request_id]
        self.finished[slot] = True
        self.handles[slot] = None
        self._retired.append(slot)

    def append(self, requests: list, slots: np.ndarray, tokens: np.ndarray) -> None:
        """Each request (at its slot) takes its token: held in the slot; those whose slot is full go onto their
        lists now."""
        counts = self.num_pending[slots]
        self.pending[slots, counts] = tokens
        counts += 1
        self.num_pending[slots] = counts
        self.tokens[slots] += 1
        self.last[slots] = tokens
        full = np.flatnonzero(counts == PENDING_TOKENS)
        for i in full.tolist():
            self.flush(requests[i])

    def flush(self, request) -> None:
        """The request's held tokens onto its list."""
        slot = request._slot
        count = int(self.num_pending[slot])
        if count:
            request._all.extend(self.pending[slot, :count].tolist())
            self.num_pending[slot] = 0

    def release_retired(self) -> None:
        """The steps that carried the retired slots' requests have been applied: the slots may be reused."""
        if self._retired:
            self._free += self._retired
            self._retired = []

    def slots_of(self, requests) -> np.ndarray | None:
        """The slots of these requests, in order; None if one has none (it is not in the scheduler)."""
        try:
            return np.fromiter(map(_SLOT, requests), np.int64, len(requests))
        except TypeError:
            return None

    def _grow(self) -> None:
        old = self.num_slots
        for name, value in list(vars(self).items()):
            if isinstance(value, np.ndarray):
                setattr(self, name, np.concatenate([value, np.zeros_like(value)]))
        self.output_ids += [""] * old
        self.handles += [None] * old
        self._free = list(range(2 * old - 1, old - 1, -1))


_SLOT = attrgetter("_slot")
