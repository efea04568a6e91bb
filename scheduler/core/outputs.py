"""What the engine hands back: per-step deltas on a per-request stream, and whole completions."""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float  # of the chosen token, from the model's raw distribution
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class RequestMetrics:
    queue_s: float = 0.0  # arrival to first scheduled
    ttft_s: float = 0.0  # arrival to first token
    e2e_s: float = 0.0  # arrival to finish
    preemptions: int = 0
    draft_tokens: int = 0  # drafted tokens verified for this request
    accepted_tokens: int = 0  # of those, accepted


@dataclass
class StepStats:
    """What one engine step did, for metrics. Counters are this step's increments."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # share of blocks held by live requests
    kv_blocks_free: int = 0
    kv_blocks_total: int = 0
    num_batched_tokens: int = 0
    num_prompt_tokens: int = 0  # prefill tokens computed (recomputation after preemption included)
    num_generation_tokens: int = 0  # tokens sampled
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found
    step_s: float = 0.0
    num_drafts: int = 0  # sequences that verified drafts this step
    num_draft_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # accepted drafts at each position
    verified_per_position: list[int] = field(default_factory=list)  # drafts reaching each position (earlier accepted)


@dataclass
class RequestOutput:
    """One step's news for one request: the new tokens and text. The last one has finished=True. (No __slots__:
    the defaults are class attributes, so token_output builds the most common output setting only what differs.)"""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    # With the first output, when asked: one entry per prompt token, the first None (it has no context).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string matched; None for EOS
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None  # on the last output
    error: str | None = None  # set when the engine failed the request
    index: int = 0  # which of the request's n completions this is about
    # On the last output: bytes at the end of the output's tokens that begin a character and never finish it,
    # left out of the text (token_ids still carry them).
    held_back_bytes: int = 0


def token_output(request_id: str, token_ids: list[int], num_prompt_tokens: int, num_output_tokens: int,
                 num_cached_tokens: int, index: int) -> RequestOutput:
    """RequestOutput(request_id, token_ids, "", num_prompt_tokens=..., num_output_tokens=..., num_cached_tokens=...,
    index=...), the rest at their defaults: a step's new tokens alone, as most outputs are. Built without the
    dataclass's __init__, which sets every field: this is about twice as fast, a thousand times a step."""
    output = _new(RequestOutput)
    output.request_id, output.token_ids, output.text = request_id, token_ids, ""
    output.num_prompt_tokens, output.num_output_tokens, output.num_cached_tokens = (num_prompt_tokens,
                                                                                   num_output_tokens,
                                                                                   num_cached_tokens)
    output.index = index
    return output


_new = object.__new__


@dataclass
class CompletionOutput:
    """A whole answer, as `LLM.generate` returns it: the first completion's text, tokens and finish reason, and
    in `.outputs` all n completions of the prompt (itself first), in index order."""

    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # from the model's raw distribution, first None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    index: int = 0
    held_back_bytes: int = 0  # bytes of a character the output began and never finished, not in text
    outputs: list[CompletionOutput] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.outputs:
            self.outputs = [self]

    def add(self, delta: RequestOutput) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.finished:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
            self.num_cached_tokens, self.metrics = delta.num_cached_tokens, delta.metrics
            self.held_back_bytes = delta.held_back_bytes


class RequestStream:
    """A request's outputs in order. Thread-safe. With `on_output`, each output goes to it instead, in the
    engine's thread, so an asyncio server can hop the output onto its loop (and bound what it holds)."""

    def __init__(self, request_id: str, on_output: Callable[[RequestOutput], None] | None = None,
                 num_completions: int = 1):
        self.request_id = request_id
        self.on_output = on_output
        self._queue: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        self.num_unfinished = num_completions
        self.finished = False  # every completion has finished
        # Set (from any thread) while the reader is far behind: the scheduler does not run the request's
        # completions, so their outputs stop growing; cleared when it catches up.
        self.paused = False

    def put(self, output: RequestOutput) -> None:
        if output.finished:
            self.num_unfinished -= 1
            self.finished = self.num_unfinished == 0
        if self.on_output is not None:
            self.on_output(output)
        else:
            self._queue.put(output)

    def get(self, timeout: float | None = None) -> RequestOutput:
        return self._queue.get(timeout=timeout)

    def get_nowait(self) -> RequestOutput | None:
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None
