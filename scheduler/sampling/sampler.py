"""Batched token sampling: penalties, temperature, top-k, top-p, min-p, then one draw per row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scheduler.sampling.batch import SamplingBatch
from scheduler.structured.guide import apply_token_bitmask


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor | None  # [N] f32, logprob of the chosen token; None when no row asked
    top_logprobs: torch.Tensor | None  # [N, n] f32, n = batch.max_num_logprobs, best first
    top_token_ids: torch.Tensor | None  # [N, n] int64


class Sampler:
    """Picks one token per row: argmax for greedy rows, an exponential-race draw for the rest.

    Logprobs (chosen token and top-n) come from log_softmax of the RAW logits, before
    logit_bias, blocked tokens, grammar masks, penalties, temperature or any truncation, as vLLM returns by
    default: they are the model's own distribution, whatever the request asks of sampling.
    Rows with a generator draw their noise from it alone, so a seeded request gets the same
    tokens whatever else shares the batch. The rest draw from `generator` (global RNG if None),
    which must live on the logits' device. No call syncs with the host.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def compute_probs(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """[N, V] f32 distribution each row samples from; greedy rows are one-hot at their argmax."""
        logits = _penalised_logits(logits, batch)
        if batch.all_greedy:
            return _one_hot(logits.argmax(dim=-1), batch.vocab_size)
        greedy_token_ids = logits.argmax(dim=-1) if batch.any_greedy else None
        logits.div_(batch.temperature.unsqueeze(1))
        logits = _apply_top_k_top_p(logits, batch)
        probs = logits.softmax(dim=-1)
        if batch.any_min_p:
            probs = _apply_min_p(probs, batch.min_p)
        if greedy_token_ids is not None:
            probs = torch.where(batch.is_greedy.unsqueeze(1), _one_hot(greedy_token_ids, batch.vocab_size), probs)
        return probs

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        assert logits.shape == (len(batch.generators), batch.vocab_size)
        if batch.all_greedy:
            token_ids = _penalised_logits(logits, batch).argmax(dim=-1)
        else:
            token_ids = self._exponential_race(self.compute_probs(logits, batch), batch)
        if batch.max_num_logprobs == 0:
            return SamplerOutput(token_ids, None, None, None)
        return SamplerOutput(token_ids, *logprobs_of(logits, token_ids, batch.max_num_logprobs))

    def sample_probs(self, probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """One token per row of `probs` (overwritten), seeded rows from their own generators."""
        return self._exponential_race(probs, batch)

    def _exponential_race(self, probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        # argmax(p / E) with E ~ Exp(1) picks token i with probability p_i, without a cumsum
        # or a sync; one-hot greedy rows come out as their argmax.
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for row in batch.seeded_rows:
            noise[row].exponential_(generator=batch.generators[row])
        # exponential_ may return exactly 0, and 0 / 0 = NaN would win the argmax for a banned token.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        return probs.div_(noise).argmax(dim=-1)


def _penalised_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    # A float32 copy: the caller's logits stay raw for logprobs, and the steps below work in place.
    logits = logits.to(torch.float32, copy=True)
    vocab_size = batch.vocab_size
    if batch.bias_token_ids is not None:
        logits.scatter_add_(1, batch.bias_token_ids, batch.bias_values)
    if batch.blocked_token_ids is not None:
        logits.masked_fill_(_token_mask(batch.blocked_token_ids, vocab_size), float("-inf"))
    if batch.token_bitmask is not None:
        apply_token_bitmask(logits, batch.token_bitmask)
    if batch.output_token_ids is None:
        return logits
    output_counts = _token_counts(batch.output_token_ids, vocab_size)
    if batch.any_repetition_penalty:
        seen = _token_mask(batch.prompt_token_ids, vocab_size) | (output_counts > 0)
        logits = _apply_repetition_penalty(logits, seen, batch.repetition_penalty)
    if batch.any_frequency_presence_penalty:
        logits -= (batch.frequency_penalty.unsqueeze(1) * output_counts
                   + batch.presence_penalty.unsqueeze(1) * (output_counts > 0))
    return logits


def _token_mask(padded_token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    # The extra column catches the padding id (vocab_size) and is sliced away.
    mask = torch.zeros(padded_token_ids.shape[0], vocab_size + 1, dtype=torch.bool, device=padded_token_ids.device)
    return mask.scatter_(1, padded_token_ids, True)[:, :vocab_size]


def _token_counts(padded_token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    counts = torch.zeros(padded_token_ids.shape[0], vocab_size + 1, dtype=torch.float32,
                         device=padded_token_ids.device)
    ones = torch.ones_like(padded_token_ids, dtype=torch.float32)
    return counts.scatter_add_(1, padded_token_ids, ones)[:, :vocab_size]


def _apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    # CTRL / HF rule: shrink positive logits, grow negative ones, so a seen token always loses ground.
    penalty = penalty.unsqueeze(1)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def _apply_top_k_top_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    if batch.any_top_p:
        return _apply_top_k_top_p_sorted(logits, batch.top_k if batch.any_top_k else None, batch.top_p)
    if batch.any_top_k:
        return _apply_top_k(logits, batch.top_k, batch.max_top_k)
    return logits


def _apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    # topk(max_top_k) is far cheaper than a full sort when no row needs top-p.
    top_values = logits.topk(max_top_k, dim=-1).values
    kth_largest = top_values.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))
    kth_largest.masked_fill_((top_k == logits.shape[-1]).unsqueeze(1), float("-inf"))  # rows with top-k off
    return logits.masked_fill_(logits < kth_largest, float("-inf"))


def _apply_top_k_top_p_sorted(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, sorted_token_ids = logits.sort(dim=-1)  # ascending
    if top_k is not None:
        kth_largest = sorted_logits.gather(1, (logits.shape[-1] - top_k).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth_largest, float("-inf"))
    # A token is dropped when it and every smaller token together hold <= 1 - top_p, which
    # leaves the smallest set holding >= top_p; the largest token is always kept.
    cumulative_probs = sorted_logits.softmax(dim=-1).cumsum_(dim=-1)
    outside_top_p = cumulative_probs <= (1 - top_p).unsqueeze(1)
    outside_top_p[:, -1] = False
    sorted_logits.masked_fill_(outside_top_p, float("-inf"))
    return logits.scatter_(1, sorted_token_ids, sorted_logits)


def _apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    probs.masked_fill_(probs < threshold, 0.0)
    return probs.div_(probs.sum(dim=-1, keepdim=True))


def _one_hot(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    one_hot = torch.zeros(token_ids.shape[0], vocab_size, dtype=torch.float32, device=token_ids.device)
    return one_hot.scatter_(1, token_ids.unsqueeze(1), 1.0)


def logprobs_of(raw_logits: torch.Tensor, token_ids: torch.Tensor,
              num_top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logprobs = torch.log_softmax(raw_logits.float(), dim=-1)
    chosen_logprobs = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    top_logprobs, top_token_ids = logprobs.topk(num_top, dim=-1)
    return chosen_logprobs, top_logprobs, top_token_ids
