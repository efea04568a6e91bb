"""One step's sampling rows as tensors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from scheduler.core.params import SamplingParams
from scheduler.tensors import to_device


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
    # logit_bias as [N, max_biased] token ids and biases, padded with (0, 0.0) so a scatter_add of the
    # padding changes nothing; None when no row has any.
    bias_token_ids: torch.Tensor | None
    bias_values: torch.Tensor | None
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
    # [N, ceil(V / 32)] int32 on the device, bit set = allowed (xgrammar's layout); rows without a grammar
    # allow all. Set by the step executor when any row is constrained.
    token_bitmask: torch.Tensor | None = None

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
        bias_token_ids, bias_values = _bias(params, device) if any(p.logit_bias for p in params) else (None, None)
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
            bias_token_ids=bias_token_ids,
            bias_values=bias_values,
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
        assert self.token_bitmask is None
        index = to_device([row for row, n in enumerate(repeats) for _ in range(n)], torch.int64,
                          self.temperature.device)
        per_row = {name: getattr(self, name)[index] for name in (
            "temperature", "is_greedy", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
            "presence_penalty") + (("bias_token_ids", "bias_values") if self.bias_token_ids is not None else ())}
        return dataclasses.replace(self, **per_row, generators=[None] * len(index), seeded_rows=[])


def _bias(params: list[SamplingParams], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p.logit_bias) for p in params)
    token_ids = [list(p.logit_bias) + [0] * (width - len(p.logit_bias)) for p in params]
    values = [list(p.logit_bias.values()) + [0.0] * (width - len(p.logit_bias)) for p in params]
    return to_device(token_ids, torch.int64, device), to_device(values, torch.float32, device)


def _pad(rows: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(map(len, rows)))  # at least one column so scatters never see an empty index
    return to_device([list(row) + [pad_id] * (width - len(row)) for row in rows], torch.int64, device)
