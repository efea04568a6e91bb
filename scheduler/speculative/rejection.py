"""Lossless verification of drafted tokens (Leviathan et al., 2023).

For each speculating sequence with drafts d1..dk, the target's distributions p1..p(k+1) (after the
request's own temperature, top-k, top-p, min-p and penalties) and the draft's q1..qk: accept d_i
with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection sample from
norm(max(0, p_i - q_i)); when all k are accepted, sample a bonus token from p(k+1). Greedy
requests accept while the target's argmax agrees (`verify_greedy` does just that, on the host, when
nothing else shapes their logits). The output has the target's distribution.
"""

from __future__ import annotations

import torch

from scheduler.tensors import to_device


def verify(target_probs: torch.Tensor, num_drafts: list[int], draft_token_ids: list[list[int]],
           draft_probs: torch.Tensor | None, is_greedy: torch.Tensor, generators: list, sample_fn) -> tuple:
    """target_probs: [sum(k_r + 1), V], each sequence's k_r + 1 rows in order. draft_probs:
    [R, K, V] with zeros past each k_r, or None for one-hot drafts (n-gram). sample_fn(probs,
    rows_generators) draws one token per row. Returns (num_accepted [R], next_token [R]) tensors."""
    device = target_probs.device
    num_seqs, max_k = len(num_drafts), max(num_drafts)
    ks = to_device(num_drafts, torch.long, device)
    starts = torch.cumsum(ks + 1, 0) - (ks + 1)
    positions = torch.arange(max(max_k, 1), device=device)
    drafts = to_device([d + [0] * (max_k - len(d)) for d in draft_token_ids], torch.long, device)
    drafts = drafts.view(num_seqs, max_k)
    # Only the probabilities of the drafted tokens, and one row per sequence below, are read:
    # never a [sequences, k + 1, vocab] copy.
    rows = (starts.unsqueeze(1) + torch.minimum(positions[:max_k].unsqueeze(0), ks.unsqueeze(1))).clamp(
        max=target_probs.shape[0] - 1)
    p_draft = target_probs[rows, drafts]
    seq = torch.arange(num_seqs, device=device)
    q_draft = torch.ones_like(p_draft) if draft_probs is None else \
        draft_probs[seq.unsqueeze(1), positions[:max_k].unsqueeze(0), drafts]
    uniform = _uniform(num_seqs, max_k, generators, device)
    accepted = torch.where(is_greedy.unsqueeze(1), p_draft > 0.5, uniform * q_draft < p_draft)
    accepted &= positions[:max_k].unsqueeze(0) < ks.unsqueeze(1)
    num_accepted = accepted.int().cumprod(dim=1).sum(dim=1)

    final_p = target_probs[starts + num_accepted]
    rejected = num_accepted < ks
    at = num_accepted.clamp(max=max(max_k - 1, 0))
    if draft_probs is None:
        rejected_draft = drafts[seq, at] if max_k else torch.zeros(num_seqs, dtype=torch.long, device=device)
        final_q = torch.zeros_like(final_p).scatter_(1, rejected_draft.unsqueeze(1), 1.0)
    else:
        final_q = draft_probs[seq, at]
    final_q = final_q * rejected.unsqueeze(1)  # all accepted: the bonus comes from p itself
    residual = (final_p - final_q).clamp_(min=0)
    total = residual.sum(dim=1, keepdim=True)
    # p == q makes rejection impossible, but rounding can still land here; p is then the answer.
    residual = torch.where((total > 0) & ~is_greedy.unsqueeze(1), residual / total.clamp(min=1e-30), final_p)
    return num_accepted, sample_fn(residual)


def verify_greedy(target_token_ids: list[int], draft_token_ids: list[list[int]]) -> tuple[list[int], list[int]]:
    """target_token_ids: the target's argmax at every verified position, k_r + 1 per sequence in
    order. A draft is accepted while it equals the argmax; the next token is the argmax after the
    last accepted one. Returns (num_accepted, next_token) lists."""
    num_accepted, next_tokens, start = [], [], 0
    for drafts in draft_token_ids:
        n = 0
        while n < len(drafts) and drafts[n] == target_token_ids[start + n]:
            n += 1
        num_accepted.append(n)
        next_tokens.append(target_token_ids[start + n])
        start += len(drafts) + 1
    return num_accepted, next_tokens


def _uniform(num_seqs: int, max_k: int, generators: list, device) -> torch.Tensor:
    uniform = torch.rand(num_seqs, max_k, device=device)
    for row, generator in enumerate(generators):
        if generator is not None:
            uniform[row] = torch.rand(max_k, device=device, generator=generator)
    return uniform
