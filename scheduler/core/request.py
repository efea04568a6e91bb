"""One sequence's state, and the bookkeeping each step does on it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from scheduler.core.params import SamplingParams, has_penalty


def _in_progress(name: str, doc: str) -> property:
    """A count on the request until the scheduler takes it, then at its slot of the scheduler's Progress arrays
    (column `name`) until it ends."""

    def get(request: Request) -> int:
        progress = request._progress
        return request._own[name] if progress is None else int(getattr(progress, name)[request._slot])

    def put(request: Request, value: int) -> None:
        progress = request._progress
        if progress is None:
            request._own[name] = value
        else:
            getattr(progress, name)[request._slot] = value

    return property(get, put, doc=doc)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"
    ABORT = "abort"


@dataclass(eq=False)
class Request:
    """One sequence's state. Tokens to compute are `all_token_ids[num_computed_tokens:]`."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    max_total_tokens: int = 0  # prompt + output cap, set by the engine from max_model_len

    status: RequestStatus = RequestStatus.WAITING
    speculative: bool = True  # may this request speculate (when the engine does)
    max_draft_tokens: int | None = None  # per-request cap on k
    num_draft_tokens: int = 0  # drafts verified so far
    num_accepted_tokens: int = 0  # of those, accepted
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first schedule
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # matched stop token id or stop string
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    generator: Any = None  # a seeded request's torch.Generator, on the engine's device
    # One of a prompt's n completions: the id its outputs carry (the request's own when n = 1), and its index.
    output_id: str = ""
    index: int = 0
    # Collected as the prompt is computed, when params.prompt_logprobs asks: one TokenLogprob (or None, for
    # the first token) per prompt token; complete once it holds num_prompt_tokens entries.
    prompt_logprobs: list | None = None
    guide: Any = None  # a structured request's grammar state (scheduler/structured/guide.py)
    stream: Any = None  # its outputs' RequestStream, whose reader may fall behind and pause it
    rank: tuple[float, float] = (0.0, 0.0)  # the scheduler's static order (Scheduler._rank), set when it is queued
    # Set by the engine: whether each new token needs the full stop check (text, grammar, logprobs, stop ids,
    # min_tokens: else a token-set lookup and a length check do), and whether its stream is told every step.
    host_checks: bool = True
    stream_deltas: bool = True
    handle: Any = None  # what the engine keeps beside the request (its Live), found by the request's slot too

    def __post_init__(self) -> None:
        # Fixed by the params, read for every row of every step: worked out once. penalised: a penalty reads the
        # token history. argmax_always: every next token is the argmax of the raw logits (greedy; no penalty, logit
        # bias, min_tokens or logprobs), whatever the step.
        # num_computed_tokens, num_placeholders, num_drafts_in_flight, num_sent_tokens: here until the scheduler takes
        # the request, then at its slot of the scheduler's Progress arrays until it ends (progress.py).
        self._own = dict(computed=0, placeholders=0, drafts_in_flight=0, sent=0)
        self._progress, self._slot = None, None
        params = self.params
        self.penalised = has_penalty(params)
        self.argmax_always = params.greedy and not self.penalised and not params.logit_bias \
            and not params.min_tokens and not params.logprobs
        self._all = list(self.prompt_token_ids)
        # Every token that may end the request once min_tokens allows (check_stop): others are passed over at once.
        self.ending_token_ids = frozenset(params.stop_token_ids) | frozenset(() if params.ignore_eos
                                                                           else self.eos_token_ids)
        self.output_id = self.output_id or self.request_id
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]

    @property
    def all_token_ids(self) -> list[int]:
        """The prompt and every token generated so far. While the request is in the scheduler, a step's token
        waits in its slot's Progress arrays (a step's tokens are applied by one array operation, not an append a
        row) until someone reads this list, which then takes them all at once."""
        progress = self._progress
        if progress is not None and progress.num_pending[self._slot]:
            progress.flush(self)
        return self._all

    num_computed_tokens = _in_progress("computed", """Tokens whose KV is computed (or counted so: a launched step's).
        Tokens to compute are all_token_ids[num_computed_tokens:] and the placeholders.""")
    num_placeholders = _in_progress("placeholders", """Output tokens sampled in a step still in flight: the device
        holds them, the host learns them a step later.""")
    num_drafts_in_flight = _in_progress("drafts_in_flight", """Drafts verified in a step still in flight: the device
        knows how many it accepted, the host a step later. The request's next tokens may start this much further on:
        their KV slots are reserved for it.""")
    num_sent_tokens = _in_progress("sent", """Output tokens its stream has been told of.""")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        """The tokens the scheduler plans with: the known ones and those still in flight."""
        return len(self.all_token_ids) + self.num_placeholders

    @property
    def output_token_ids(self) -> list[int]:
        """The tokens generated so far (a copy: all_token_ids past the prompt holds them, a list a request)."""
        return self.all_token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Still collecting prompt logprobs: its prompt must be computed, not taken from the prefix cache."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def paused(self) -> bool:
        """Its reader is far behind: the scheduler holds it back (RequestStream.paused)."""
        return self.stream is not None and self.stream.paused

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
        if self._progress is not None:
            self._progress.tokens[self._slot] += 1
            self._progress.last[self._slot] = token_id

    def draft_depth(self, step_depth: int) -> int:
        """Drafts this request may verify in a step that drafts step_depth tokens a sequence."""
        if not self.speculative or step_depth == 0:
            return 0
        cap = step_depth if self.max_draft_tokens is None else min(step_depth, self.max_draft_tokens)
        # The drafts' KV slots must stay within the request's token limit, whatever the step in flight accepts.
        return max(0, min(cap, self.max_total_tokens - self.num_tokens_with_placeholders
                                - self.num_drafts_in_flight))

    def truncate_output(self, num_output_tokens: int) -> None:
        """Drop output tokens past a stop (a finishing request only: the KV is not rolled back)."""
        del self.all_token_ids[self.num_prompt_tokens + num_output_tokens:]
        if self._progress is not None:
            self._progress.tokens[self._slot] = len(self._all)
            self._progress.last[self._slot] = self._all[-1]
