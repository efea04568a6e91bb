"""A request's outputs that waited together for its consumer, as one output per completion.

A server that falls behind the engine (a step's outputs for a thousand streams take the event loop longer than the
engine takes to make the next step's) finds several deltas queued for a request. Sent one message each, every token
costs a message; joined, one message carries every token produced since the client last took one, so the
per-message cost (a protobuf, a write, an await) is paid once per turn of the loop, not once per step. Nothing is
dropped or reordered: a completion's tokens, text and logprobs are concatenated in order, and its last delta's
end (finish reason, stop reason, usage, timing, held-back bytes) is the joined output's."""

from __future__ import annotations

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
