"""A request's outputs on the event loop, waiting for its consumer (Inbox), and what waited taken together as
one output per completion (coalesce).

A server that falls behind the engine (a step's outputs for a thousand streams take the event loop longer than the
engine takes to make the next step's) finds several deltas queued for a request. Sent one message each, every token
costs a message; joined, one message carries every token produced since the client last took one, so the
per-message cost (a protobuf, a write, an await) is paid once per turn of the loop, not once per step. Nothing is
dropped or reordered: a completion's tokens, text and logprobs are concatenated in order, and its last delta's
end (finish reason, stop reason, usage, timing, held-back bytes) is the joined output's."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from scheduler.core.outputs import RequestOutput


def coalesce(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """One output per completion (of n) for consecutive deltas, each at its completion's first place. An output
    carrying an error ends the list unjoined, after what came before it: the request fails there."""
    if len(outputs) == 1:
        return outputs
    joined: list[RequestOutput] = []
    at: dict[int, int] = {}  # completion index -> its place in joined
    for output in outputs:
        if output.error is not None:
            joined.append(output)
            break
        place = at.get(output.index)
        if place is None:
            at[output.index] = len(joined)
            joined.append(output)
        else:
            joined[place] = join(joined[place], output)
    return joined


def join(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two consecutive deltas of one completion as one (neither is changed)."""
    logprobs = None
    if earlier.logprobs is not None or later.logprobs is not None:
        logprobs = (earlier.logprobs or []) + (later.logprobs or [])  # each delta's align with its tokens
    return replace(later, token_ids=earlier.token_ids + later.token_ids, text=earlier.text + later.text,
                   logprobs=logprobs, prompt_logprobs=earlier.prompt_logprobs if earlier.prompt_logprobs is not None
                   else later.prompt_logprobs)


class Inbox:
    """One request's outputs on the event loop, waiting for its consumer, which takes all of them at once. The
    consumer is woken for the first token, then for every `interval` tokens, an end (of any completion) or an
    error, and when max_pending wait (the request pauses there: its consumer must run to resume it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: int, max_pending: int):
        self.loop = loop
        self.interval = interval
        self.max_pending = max_pending
        self.outputs: list[RequestOutput] = []
        self.num_tokens = 0  # in outputs
        self.ready = False  # the consumer may take outputs now
        self.sent_first = interval == 1  # the first token has been taken (only counted with an interval)
        self.waiter: asyncio.Future | None = None

    def put(self, output: RequestOutput) -> int:
        """Adds an output; returns how many wait."""
        self.outputs.append(output)
        self.num_tokens += len(output.token_ids)
        if not self.ready:
            self.ready = (self.interval == 1 or self.num_tokens >= self.interval or not self.sent_first
                          or output.finished or output.error is not None or len(self.outputs) >= self.max_pending)
        if self.ready and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        return len(self.outputs)

    async def take(self) -> list[RequestOutput]:
        """Every output that waits, in order, once the consumer is due them."""
        while not self.ready:
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        outputs, self.outputs = self.outputs, []
        self.sent_first = self.sent_first or self.num_tokens > 0
        self.num_tokens, self.ready = 0, False
        return outputs
