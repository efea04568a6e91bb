"""What a request's stream is told after a step: the tokens (with their text and logprobs) since its last output,
and at its end why it ended and what it cost; and the step's drafts counted by position."""

from __future__ import annotations

import time

from scheduler.core.outputs import RequestMetrics, RequestOutput
from scheduler.core.request import FinishReason, Request
from scheduler.core.scheduler import StepResult
from scheduler.core.stopping import check_stop, first_stop
from scheduler.loop.admission import Live


def check_new_tokens(live: Live, result: StepResult, now: float) -> FinishReason | None:
    """Check the step's new tokens (already on the request) one by one for a stop, dropping those past it
    (speculation may run past one); their logprobs kept where asked. Returns why the request stops, if it does."""
    request, new_ids = live.request, result.new_token_ids
    if request.first_token_time is None:
        request.first_token_time = now
    first = request.num_output_tokens - len(new_ids)
    if len(new_ids) == 1 and request.guide is None and live.detokenizer is None:
        # Most rows of a step without text or grammar: one token, nothing to decode or to match stop strings in.
        reason, stop_reason = check_stop(request, new_ids[0], request.num_output_tokens)
        if reason is not None:
            request.stop_reason = stop_reason
    else:
        reason, stop = None, first_stop(request, new_ids, live.detokenizer)
        if stop is not None:
            count, reason, request.stop_reason = stop
            request.truncate_output(count)
    if result.logprobs is not None:
        for lp in result.logprobs[:request.num_output_tokens - first]:
            lp.top = lp.top[:request.params.logprobs]
            live.logprobs.append(lp)
    return reason


def delta_output(live: Live) -> RequestOutput:
    """The request's tokens since its last output (none when nothing is new), its prompt's logprobs the first time
    they are complete."""
    request = live.request
    num_output_tokens = len(request.output_token_ids)  # read directly, as below: one output a row a step
    new_ids = request.output_token_ids[live.num_sent_tokens:]
    new_logprobs = live.logprobs[live.num_sent_tokens:] if live.logprobs is not None else None
    live.num_sent_tokens = num_output_tokens
    text, held_back = "", 0
    if live.detokenizer is not None:
        text, held_back = live.detokenizer.take_delta(request.is_finished), live.detokenizer.held_back_bytes
    prompt_logprobs = None
    if not live.prompt_logprobs_sent and not request.needs_prompt_logprobs:  # an abort mid-prompt sends none
        prompt_logprobs, live.prompt_logprobs_sent = request.prompt_logprobs, True
    return RequestOutput(request.output_id, new_ids, text, new_logprobs, prompt_logprobs, False, None, None,
                         len(request.prompt_token_ids), num_output_tokens, request.num_cached_tokens, None, None,
                         request.index, held_back)


def final_output(live: Live) -> RequestOutput:
    """The last output of a request that has finished (finish_reason set): the rest of its tokens, why it ended, its
    metrics."""
    request = live.request
    output = delta_output(live)
    output.finished, output.finish_reason, output.stop_reason = True, request.finish_reason.value, request.stop_reason
    now = time.monotonic()
    start = request.arrival_time
    output.metrics = RequestMetrics(
        queue_s=(request.first_scheduled_time or now) - start, ttft_s=(request.first_token_time or now) - start,
        e2e_s=now - start, preemptions=request.num_preemptions, draft_tokens=request.num_draft_tokens,
        accepted_tokens=request.num_accepted_tokens)
    return output


def failed_output(request: Request, error: str) -> RequestOutput:
    """The last output of a request ended by a failure (its own processing, or the engine's): aborted, with why."""
    return RequestOutput(request.output_id, [], "", finished=True, finish_reason="abort", error=error,
                         index=request.index)


def per_position(results: list[StepResult], accepted: bool) -> list[int]:
    """Drafts accepted at each position, or (accepted=False) verified there: drafted, every earlier one accepted."""
    counts = [0] * max((r.num_drafts for r in results), default=0)
    for r in results:
        for i in range(r.num_accepted if accepted else min(r.num_drafts, r.num_accepted + 1)):
            counts[i] += 1
    return counts
