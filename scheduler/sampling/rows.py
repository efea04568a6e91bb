"""Sampling rules of a request and the rows a step samples with: one row per sampling request, or,
when verifying drafts, one per verified position."""

from __future__ import annotations

import torch

from scheduler.core.params import has_penalty
from scheduler.core.request import Request
from scheduler.core.stopping import blocked_ids
from scheduler.sampling.batch import SamplingBatch

__all__ = ["draft_rows", "has_penalty", "num_outputs", "plain_greedy", "positions_differ", "sampling_rows"]


def num_outputs(request: Request) -> int:
    """Output tokens before the one sampled next: those in flight count, though the host has not read them."""
    return request.num_output_tokens + request.num_placeholders


def plain_greedy(request: Request) -> bool:
    """Greedy, and nothing changes the logits it takes the argmax of (penalties, logit_bias, tokens
    blocked by min_tokens): its next token is the argmax of the raw logits, and so is every verified one."""
    params = request.params
    return params.greedy and not has_penalty(params) and not params.logit_bias and (
        not params.min_tokens or not blocked_ids(request, num_outputs(request)))


def positions_differ(request: Request) -> bool:
    """Whether a verified position samples differently from the request's own row: penalties see
    the drafts before it, min_tokens may block stops at some positions only, and a grammar allows what
    follows the drafts before it."""
    return request.guide is not None or has_penalty(request.params) or bool(
        blocked_ids(request, num_outputs(request)))


def sampling_rows(requests: list[Request], vocab_size: int, device: torch.device,
                  drafts: list[list[int]] | None = None) -> SamplingBatch:
    """One row per request, or with drafts one row per verified position: row i of a request sees
    the drafts before it as already generated (penalties and min_tokens follow them). Rows with
    drafts draw no noise of their own (verification draws it), so they carry no generator."""
    params, prompts, outputs, generators, blocked = [], [], [], [], []
    for j, request in enumerate(requests):
        penalised = has_penalty(request.params)
        for i in range(len(drafts[j]) + 1) if drafts is not None else [0]:
            params.append(request.params)
            prompts.append(request.prompt_token_ids if request.params.repetition_penalty != 1.0 else [])
            # Only penalties read the histories: copying them for other rows would cost O(length) each.
            drafted = drafts[j][:i] if drafts is not None else []
            outputs.append(request.output_token_ids + drafted if penalised else [])
            generators.append(request.generator if drafts is None else None)
            blocked.append(blocked_ids(request, num_outputs(request) + i))
    return SamplingBatch.build(params, prompts, outputs, generators, blocked, vocab_size, device)


def draft_rows(requests: list[Request], vocab_size: int, device: torch.device) -> SamplingBatch | None:
    """How a draft model picks tokens for these requests; None when all draft greedily."""
    return None if all(plain_greedy(r) for r in requests) else sampling_rows(requests, vocab_size, device)
