"""Sampling rules of a request and the rows a step samples with: one row per sampling request, or,
when verifying drafts, one per verified position."""

from __future__ import annotations

from operator import attrgetter

import numpy as np
import torch

from scheduler.core.params import has_penalty
from scheduler.core.progress import Progress
from scheduler.core.request import Request
from scheduler.core.stopping import blocked_ids
from scheduler.sampling.batch import SamplingBatch
from scheduler.sampling.picking import num_outputs, plain_greedy
from scheduler.tensors import to_device

__all__ = ["draft_rows", "plain_rows", "sampling_rows"]


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


def plain_rows(progress: Progress, slots: np.ndarray, requests: list[Request], vocab_size: int,
               device: torch.device) -> SamplingBatch | None:
    """sampling_rows for requests (at these Progress slots) that all sample by their parameters alone (no penalty,
    logit bias or min_tokens), read from the progress arrays by vector operations: no Python a row. None where one
    does not."""
    if not progress.plain_sampling[slots].all():
        return None
    temperature, top_p, min_p = progress.temperature[slots], progress.top_p[slots], progress.min_p[slots]
    top_k = progress.top_k[slots]
    top_k = np.where((top_k > 0) & (top_k < vocab_size), top_k, vocab_size)
    greedy = temperature == 0
    n = len(slots)
    floats = torch.from_numpy(np.stack([np.where(greedy, np.float32(1.0), temperature), top_p, min_p,
                                        np.ones(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32)]))
    floats = floats.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else floats.to(device)
    temperature_t, top_p_t, min_p_t, repetition, frequency, presence = floats.unbind(0)
    seeded = progress.seeded[slots]
    active_top_k = top_k[top_k < vocab_size]
    return SamplingBatch(
        temperature=temperature_t, is_greedy=to_device(greedy.tolist(), torch.bool, device),
        top_k=to_device(top_k.tolist(), torch.int64, device), top_p=top_p_t, min_p=min_p_t,
        repetition_penalty=repetition, frequency_penalty=frequency, presence_penalty=presence,
        prompt_token_ids=None, output_token_ids=None, blocked_token_ids=None, bias_token_ids=None, bias_values=None,
        generators=list(map(_GENERATOR, requests)) if seeded.any() else [None] * n,
        seeded_rows=np.flatnonzero(seeded).tolist(), vocab_size=vocab_size,
        max_top_k=int(active_top_k.max()) if len(active_top_k) else 0,
        max_num_logprobs=int(progress.num_logprobs[slots].max()), all_greedy=bool(greedy.all()),
        any_greedy=bool(greedy.any()), any_top_k=bool(len(active_top_k)), any_top_p=bool((top_p < 1.0).any()),
        any_min_p=bool((min_p > 0.0).any()), any_repetition_penalty=False, any_frequency_presence_penalty=False)


def draft_rows(requests: list[Request], vocab_size: int, device: torch.device) -> SamplingBatch | None:
    """How a draft model picks tokens for these requests; None when all draft greedily."""
    return None if all(plain_greedy(r) for r in requests) else sampling_rows(requests, vocab_size, device)


_GENERATOR = attrgetter("generator")
