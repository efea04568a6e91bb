"""What a request's stream is told after a step: the tokens (with their text and logprobs) since its last output,
and at its end why it ended and what it cost; and what the step did (StepStats, drafts counted by position)."""

from __future__ import annotations

import time
from itertools import compress
from operator import attrgetter

import numpy as np

from scheduler.core.outputs import RequestMetrics, RequestOutput, StepStats, token_output
from scheduler.core.progress import Progress
from scheduler.core.request import FinishReason, Request
from scheduler.core.scheduler import PlainTokens, Scheduler, SchedulerOutput, StepResult
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
        if request.guide is not None:
            request.guide.check()  # a failed grammar ends its request with the error (Engine._settle)
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
    num_prompt_tokens = len(request.prompt_token_ids)  # read directly, as below: one output a row a step
    num_output_tokens = len(request.all_token_ids) - num_prompt_tokens
    new_ids = request.all_token_ids[num_prompt_tokens + live.num_sent_tokens:]
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


def step_stats(scheduler: Scheduler, sched: SchedulerOutput, collected: list, num_prompt_tokens: int, queried: int,
               hits: int, start: float, speculating: bool) -> StepStats:
    """What a step did: the scheduler's state after it, the tokens it made, its drafts (where speculating) by
    position. queried, hits: the pool's prefix-cache counters before the step; start: its perf_counter start."""
    pool = scheduler.pool
    drafted = [r for results in collected if not isinstance(results, PlainTokens) for r in results
               if r.num_drafts] if speculating else []
    return StepStats(
        num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
        kv_cache_usage=pool.num_used_blocks / pool.num_blocks, kv_blocks_free=pool.num_free_blocks,
        kv_blocks_total=pool.num_blocks, num_batched_tokens=sched.num_batched_tokens,
        num_prompt_tokens=num_prompt_tokens, num_generation_tokens=sum(map(num_new_tokens, collected)),
        num_preemptions=len(sched.preempted), prefix_cache_queries=pool.prefix_queried_tokens - queried,
        prefix_cache_hits=pool.prefix_hit_tokens - hits, step_s=time.perf_counter() - start,
        num_drafts=len(drafted), num_draft_tokens=sum(r.num_drafts for r in drafted),
        accepted_per_position=per_position(drafted, accepted=True),
        verified_per_position=per_position(drafted, accepted=False))


def per_position(results: list[StepResult], accepted: bool) -> list[int]:
    """Drafts accepted at each position, or (accepted=False) verified there: drafted, every earlier one accepted."""
    counts = [0] * max((r.num_drafts for r in results), default=0)
    for r in results:
        for i in range(r.num_accepted if accepted else min(r.num_drafts, r.num_accepted + 1)):
            counts[i] += 1
    return counts


def num_new_tokens(results: list[StepResult] | PlainTokens) -> int:
    """Tokens a step's results added to their requests."""
    return len(results) if isinstance(results, PlainTokens) else sum(map(len, map(_NEW_TOKENS, results)))


def plain_checks(plain: PlainTokens, progress: Progress, eos: np.ndarray) -> tuple[list[StepResult], PlainTokens]:
    """Split a step's plain rows by array operations: those whose token may end them or that need more than a stop
    check (a first token, an EOS or stop token, the length cap, text, a grammar, logprobs: check_new_tokens), as
    StepResults; and the rest, whose only news is their token."""
    slots, tokens = plain.slots, np.array(plain.token_ids, dtype=np.int64)
    num_tokens = progress.tokens[slots]
    checked = progress.watched[slots] | (num_tokens >= progress.max_total[slots]) \
        | (num_tokens == progress.prompt[slots] + 1)
    if len(eos):
        checked |= np.isin(tokens, eos) & progress.ends_on_eos[slots]
    if not checked.any():
        return [], plain
    rest = ~checked
    rows = [StepResult(plain.requests[i], [plain.token_ids[i]], None) for i in np.flatnonzero(checked).tolist()]
    return rows, PlainTokens(list(compress(plain.requests, rest)), list(compress(plain.token_ids, rest)),
                             slots[rest])


def plain_deltas(lives: dict[str, Live], quiet: PlainTokens, progress: Progress,
                 outputs: list[tuple[Live, RequestOutput]]) -> None:
    """delta_output for rows whose only news is their token (no text, grammar or logprobs; prompt logprobs sent),
    built only for the rows whose streams are told every step: the counts by array operations, the outputs by map
    (token_output), a Python step a row only where more than this step's token is new."""
    told = progress.deltas[quiet.slots]
    if not told.any():
        return
    requests, tokens, slots = quiet.requests, quiet.token_ids, quiet.slots
    if not told.all():
        requests, tokens, slots = list(compress(requests, told)), list(compress(tokens, told)), slots[told]
    num_prompt = progress.prompt[slots]
    num_output = progress.tokens[slots] - num_prompt
    sent = progress.sent[slots]
    progress.sent[slots] = num_output
    new_ids = [[token] for token in tokens]
    for i in np.flatnonzero(sent != num_output - 1).tolist():
        new_ids[i] = requests[i].all_token_ids[int(num_prompt[i] + sent[i]):]
    # Each row's Live and output id from lists by slot, its counts from arrays: no request touched a row.
    slot_list = slots.tolist()
    handles = list(map(progress.handles.__getitem__, slot_list))
    if None in handles:  # a request the engine did not make
        handles = list(map(lives.__getitem__, map(_ID, requests)))
    outputs.extend(zip(handles, map(token_output, map(progress.output_ids.__getitem__, slot_list), new_ids,
                                    num_prompt.tolist(), num_output.tolist(), progress.cached[slots].tolist(),
                                    progress.index[slots].tolist())))


_NEW_TOKENS, _ID = attrgetter("new_token_ids"), attrgetter("request_id")
