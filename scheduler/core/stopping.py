"""When a request stops: EOS, stop token ids, stop strings, the length cap, a completed grammar, and
min_tokens, which holds all but the length cap back. The engine checks each new token here, the sampler blocks what
would stop a request too early, and the detokenizer asks before matching stop strings."""

from __future__ import annotations

from scheduler.core.params import SamplingParams
from scheduler.core.request import FinishReason, Request


def may_stop(params: SamplingParams, num_output_tokens: int) -> bool:
    """Whether an output of this many tokens may end on EOS, a stop token or a stop string."""
    return num_output_tokens >= params.min_tokens


def blocked_ids(request: Request, num_output_tokens: int) -> list[int]:
    """Tokens the sampler must not pick as output token num_output_tokens + 1: they would end the
    request before min_tokens (min_tokens counts outputs, the one being picked among them)."""
    params = request.params
    if may_stop(params, num_output_tokens):
        return []
    return list(params.stop_token_ids) + ([] if params.ignore_eos else list(request.eos_token_ids))


def check_stop(request: Request, token_id: int, num_output_tokens: int) -> tuple[FinishReason | None, int | None]:
    """Does the num_output_tokens-th output token (token_id) end the request? (reason, matched stop token)"""
    params = request.params
    if may_stop(params, num_output_tokens):
        if not params.ignore_eos and token_id in request.eos_token_ids:
            return FinishReason.STOP, None
        if token_id in params.stop_token_ids:
            return FinishReason.STOP, token_id
    if request.num_prompt_tokens + num_output_tokens >= request.max_total_tokens:
        return FinishReason.LENGTH, None
    return None, None


def first_stop(request: Request, new_token_ids: list[int], detokenizer=None) -> tuple[int, FinishReason, object] | None:
    """The step's new tokens (already on the request) checked one by one, each also fed to the
    detokenizer (which matches stop strings): (output length at the stop, reason, what matched), or
    None. Tokens past the stop (speculation may run past one) are not fed."""
    first = request.num_output_tokens - len(new_token_ids)
    guide = request.guide
    for count, token_id in enumerate(new_token_ids, start=first + 1):
        if guide is not None and guide.end is not None and count > guide.end:
            return count - 1, FinishReason.STOP, None  # the grammar refused this token: it is not output
        reason, stop_reason = check_stop(request, token_id, count)
        if detokenizer is not None:
            stop_str = detokenizer.add_tokens([token_id], count)
            if stop_str is not None and reason != FinishReason.STOP:
                reason, stop_reason = FinishReason.STOP, stop_str
        if reason is None and guide is not None and guide.end == count:
            reason = FinishReason.STOP  # the grammar is complete (its stop token, even with ignore_eos)
        if reason is not None:
            return count, reason, stop_reason
    return None
