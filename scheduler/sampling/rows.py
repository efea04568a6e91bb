"""Sampling rules of a request and the rows a step samples with: one row per sampling request, or,
when verifying drafts, one per verified position."""

from __future__ import annotations

import torch

from scheduler.core.params import has_penalty
from scheduler.core.request import Request
from scheduler.core.stopping import blocked_ids
from scheduler.sampling.batch import SamplingBatch
from scheduler.sampling.picking import num_outputs, plain_greedy

__all__ = ["draft_rows", "sampling_rows"]


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
