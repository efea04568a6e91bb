"""How each row's next token is picked, asked by every part of a step: whether it is the argmax of the raw
logits, whether verifying drafts is an argmax comparison, whether the device can verify them alone, whether
the step may run ahead of the host, and whether verified positions sample differently from the row's own. The
answers hang on the request's parameters, grammar and state only."""

from __future__ import annotations

from operator import attrgetter
from typing import TYPE_CHECKING

from scheduler.core.params import has_penalty
from scheduler.core.request import Request
from scheduler.core.stopping import blocked_ids

if TYPE_CHECKING:
    from scheduler.core.scheduler import ScheduledRequest

__all__ = ["argmax_only", "deferrable", "greedy_verify", "num_outputs", "plain_greedy", "positions_differ",
           "verifiable_on_device"]

# Columns read by map: a pass over the rows without a Python frame a row.
_REQUEST, _GUIDE = attrgetter("request"), attrgetter("guide")
_PENALISED, _PROMPT_LOGPROBS, _ARGMAX_ALWAYS = (attrgetter("penalised"), attrgetter("prompt_logprobs"),
                                                attrgetter("argmax_always"))


def num_outputs(request: Request) -> int:
    """Output tokens before the one sampled next: those in flight count, though the host has not read them."""
    return request.num_output_tokens + request.num_placeholders


def plain_greedy(request: Request) -> bool:
    """Greedy, and nothing changes the logits it takes the argmax of (penalties, logit_bias, tokens
    blocked by min_tokens): its next token is the argmax of the raw logits, and so is every verified one."""
    params = request.params
    return params.greedy and not has_penalty(params) and not params.logit_bias and (
        not params.min_tokens or not blocked_ids(request, num_outputs(request)))


def argmax_only(requests: list[Request]) -> bool:
    """Every request's token is its logits' argmax (under its grammar's mask, if any), without logprobs: no
    sampling rows needed."""
    return all(map(_ARGMAX_ALWAYS, requests)) \
        or all(r.argmax_always or (plain_greedy(r) and not r.params.logprobs) for r in requests)


def greedy_verify(sampled: list[ScheduledRequest]) -> bool:
    """Verifying every row's drafts is one argmax comparison over the raw logits (no grammar, nothing that
    changes them)."""
    return all(plain_greedy(s.request) and s.request.guide is None for s in sampled)


def verifiable_on_device(batch: list[ScheduledRequest]) -> bool:
    """Every token the step samples is its raw logits' argmax, with nothing else to shape them or to report:
    the device can verify its drafts without the host (speculative/loop.py)."""
    return all(s.request.argmax_always and s.request.guide is None for s in batch if s.samples)


def positions_differ(request: Request) -> bool:
    """Whether a verified position samples differently from the request's own row: penalties see
    the drafts before it, min_tokens may block stops at some positions only, and a grammar allows what
    follows the drafts before it."""
    return request.guide is not None or has_penalty(request.params) or bool(
        blocked_ids(request, num_outputs(request)))


def deferrable(batch: list[ScheduledRequest]) -> bool:
    """Whether the step may be launched and its host work left for later, while the device runs it.

    Plain decoding and prefill overlap fully, greedy or sampled, seeded or not, with logit_bias: the next
    step needs nothing of the host but the count of tokens, so it is launched before the host has read
    this one's. A step with drafts overlaps in part: where the device verifies them (verifiable_on_device)
    the next step's positions move on there; otherwise drafting reads the token history, so its tokens
    reach the host before the next step is scheduled, but their stop checks, detokenization and streaming
    wait until the next step is launched. A grammar's next mask follows the token in flight, but only the
    sampling needs it: the step's forward is launched first, then the host reads the tokens in flight and
    fills the masks while the device runs it. Requests that need the host to know every token before the
    next step is built make their step synchronous: penalties (they read the output history) and prompt
    logprobs (collected on the host from the chunk's logits). Logprobs of sampled tokens travel with them;
    min_tokens needs only the count. The choice is made for each step."""
    requests = list(map(_REQUEST, batch))
    if not any(map(_PENALISED, requests)) and list(map(_PROMPT_LOGPROBS, requests)).count(None) == len(requests):
        return True  # most steps: no penalty, no prompt logprobs
    return all(not (r := s.request).needs_prompt_logprobs and (not s.samples or not r.penalised) for s in batch)
