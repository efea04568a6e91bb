"""Batched token sampling: penalties, temperature, top-k, top-p, min-p, then one draw per row."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from scheduler.core.request import SamplingParams


@dataclass
class SamplingBatch:
    """Per-step tensors for the N rows that sample (one row per sequence).

    Token-id tensors are padded with `vocab_size`, an id past the vocabulary that the
    sampler scatters into a spare column and drops. They are None when no row needs them.
    """

    temperature: torch.Tensor  # [N] f32; greedy rows hold 1.0 so dividing by it is safe (see is_greedy)
    is_greedy: torch.Tensor  # [N] bool, params.temperature == 0
    top_k: torch.Tensor  # [N] int64; vocab_size where off (0 or >= vocab_size asked)
    top_p: torch.Tensor  # [N] f32; 1.0 = off
    min_p: torch.Tensor  # [N] f32; 0.0 = off
    repetition_penalty: torch.Tensor  # [N] f32; 1.0 = off
    frequency_penalty: torch.Tensor  # [N] f32
    presence_penalty: torch.Tensor  # [N] f32
    prompt_token_ids: torch.Tensor | None  # [N, max_prompt_len] int64; only for repetition penalty
    output_token_ids: torch.Tensor | None  # [N, max_output_len] int64; only for any penalty
    blocked_token_ids: torch.Tensor | None  # [N, max_blocked] int64; logits forced to -inf
    generators: list[torch.Generator | None]  # per row; on the logits' device
    seeded_rows: list[int]  # rows that draw their noise from their own generator (greedy rows excluded)
    vocab_size: int
    max_top_k: int  # largest active top_k; 0 when no row uses top-k
    max_num_logprobs: int  # largest params.logprobs; 0 = no row asked
    all_greedy: bool
    any_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_repetition_penalty: bool
    any_frequency_presence_penalty: bool

    @classmethod
    def build(cls, params: list[SamplingParams], prompt_token_ids: list[list[int]],
              output_token_ids: list[list[int]], generators: list[torch.Generator | None],
              blocked_token_ids: list[list[int]], vocab_size: int, device: torch.device) -> SamplingBatch:
        """Packs one step's per-row parameters into tensors on `device`; all lists have one entry per row."""
        num_rows = len(params)
        assert num_rows > 0
        assert len(prompt_token_ids) == len(output_token_ids) == len(generators) == len(blocked_token_ids) == num_rows
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        active_top_k = [k for k in top_k if k < vocab_size]
        any_repetition_penalty = any(p.repetition_penalty != 1.0 for p in params)
        any_frequency_presence_penalty = any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params)
        any_penalty = any_repetition_penalty or any_frequency_presence_penalty
        # One host-to-device copy for all float parameters.
        floats = to_device(
            [[p.temperature for p in params], [p.top_p for p in params], [p.min_p for p in params],
             [p.repetition_penalty for p in params], [p.frequency_penalty for p in params],
             [p.presence_penalty for p in params]],
            torch.float32, device)
        temperature, top_p, min_p, repetition_penalty, frequency_penalty, presence_penalty = floats.unbind(0)
        is_greedy = temperature == 0
        greedy_rows = [p.greedy for p in params]
        return cls(
            temperature=temperature.masked_fill(is_greedy, 1.0),
            is_greedy=is_greedy,
            top_k=to_device(top_k, torch.int64, device),
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            prompt_token_ids=_pad(prompt_token_ids, vocab_size, device) if any_repetition_penalty else None,
            output_token_ids=_pad(output_token_ids, vocab_size, device) if any_penalty else None,
            blocked_token_ids=_pad(blocked_token_ids, vocab_size, device) if any(blocked_token_ids) else None,
            generators=list(generators),
            seeded_rows=[row for row, gen in enumerate(generators) if gen is not None and not greedy_rows[row]],
            vocab_size=vocab_size,
            max_top_k=max(active_top_k, default=0),
            max_num_logprobs=max(p.logprobs for p in params),
            all_greedy=all(greedy_rows),
            any_greedy=any(greedy_rows),
            any_top_k=bool(active_top_k),
            any_top_p=any(p.top_p < 1.0 for p in params),
            any_min_p=any(p.min_p > 0.0 for p in params),
            any_repetition_penalty=any_repetition_penalty,
            any_frequency_presence_penalty=any_frequency_presence_penalty,
        )


    def repeat_rows(self, repeats: list[int]) -> SamplingBatch:
        """Row i repeated repeats[i] times, without generators: one row per verified position of a
        request whose drafts are being checked. Only for rows whose sampling does not depend on the
        tokens before them (no penalties, nothing blocked), which share every tensor here."""
        assert self.prompt_token_ids is None and self.output_token_ids is None and self.blocked_token_ids is None
        index = to_device([row for row, n in enumerate(repeats) for _ in range(n)], torch.int64,
                          self.temperature.device)
        per_row = {name: getattr(self, name)[index] for name in (
            "temperature", "is_greedy", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
            "presence_penalty")}
        return dataclasses.replace(self, **per_row, generators=[None] * len(index), seeded_rows=[])


def _pad(rows: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(map(len, rows)))  # at least one column so scatters never see an empty index
    return to_device([list(row) + [pad_id] * (width - len(row)) for row in rows], torch.int64, device)


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on `device`; to CUDA through pinned memory, so the copy does not wait
    for the GPU work queued before it (the step's forward pass)."""
    if device.type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    return torch.tensor(data, dtype=dtype).pin_memory().to(device, non_blocking=True)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor | None  # [N] f32, logprob of the chosen token; None when no row asked
    top_logprobs: torch.Tensor | None  # [N, n] f32, n = batch.max_num_logprobs, best first
    top_token_ids: torch.Tensor | None  # [N, n] int64


class Sampler:
    """Picks one token per row: argmax for greedy rows, an exponential-race draw for the rest.

    Logprobs (chosen token and top-n) come from log_softmax of the RAW logits, before
    blocked tokens, penalties, temperature or any truncation, as vLLM returns by default.
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
    if batch.blocked_token_ids is not None:
        logits.masked_fill_(_token_mask(batch.blocked_token_ids, vocab_size), float("-inf"))
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
