"""Prompt logprobs (vLLM semantics): for each prompt position i > 0, the logprob of prompt token i given the
tokens before it, and the top-n alternatives there; position 0 has none.

The logits at position p give the distribution of token p + 1, so a chunk computing positions [start, end)
yields the entries of tokens start + 1 .. min(end, num_prompt). A request collecting them asks the runner for
the logits of its chunk's tokens from the first position it still lacks to the end, the last of which is the
row it samples from when the chunk ends the prompt."""

from __future__ import annotations

import torch

from scheduler.core.outputs import TokenLogprob
from scheduler.core.request import Request
from scheduler.sampling.sampler import logprobs_of


def prompt_rows(request: Request, num_new_tokens: int) -> tuple[int, int]:
    """(first position, count) of the prompt-logprob rows the chunk of num_new_tokens from
    request.num_computed_tokens yields; count 0 when it yields none."""
    if not request.needs_prompt_logprobs:
        return 0, 0
    first = max(request.num_computed_tokens, len(request.prompt_logprobs) - 1)  # positions already done are skipped
    end = min(request.num_computed_tokens + num_new_tokens, request.num_prompt_tokens - 1)
    return first, max(0, end - first)


def collect(logits: torch.Tensor, row_starts: list[int], requests: list[Request], rows: list[tuple[int, int]]):
    """Append each request's prompt logprobs from its rows of `logits` (rows[i] = (first position, count),
    starting at logits row row_starts[i]). One copy to the host for all of them."""
    index, targets = [], []
    for start, request, (first, count) in zip(row_starts, requests, rows):
        index.extend(range(start, start + count))
        targets.extend(request.prompt_token_ids[first + 1:first + 1 + count])
    device = logits.device
    num_top = max(r.params.prompt_logprobs for r in requests)
    chosen, top_values, top_ids = logprobs_of(logits[torch.tensor(index, device=device)],
                                              torch.tensor(targets, device=device), num_top)
    chosen, top_values, top_ids = chosen.tolist(), top_values.tolist(), top_ids.tolist()
    i = 0
    for request, (_, count) in zip(requests, rows):
        n = request.params.prompt_logprobs
        for _ in range(count):
            request.prompt_logprobs.append(TokenLogprob(targets[i], chosen[i], list(zip(top_ids[i][:n],
                                                                                       top_values[i][:n]))))
            i += 1


def take(logits: torch.Tensor, hidden: torch.Tensor | None, requests: list[Request], num_logits: list[int],
         rows: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Collect the prompt logprobs of the requests that asked for them (rows[i] = (first position, count) of their
    num_logits[i] logits rows, which come first), and return the logits (and hidden states) of the sampled rows
    alone, as a step without prompt logprobs has them."""
    row_starts, keep, start = [], [], 0
    for n, (_, count) in zip(num_logits, rows):
        row_starts.append(start)
        keep.extend(range(start + count, start + n))
        start += n
    asking = [i for i, (_, count) in enumerate(rows) if count]
    collect(logits, [row_starts[i] for i in asking], [requests[i] for i in asking], [rows[i] for i in asking])
    keep = torch.tensor(keep, dtype=torch.long, device=logits.device)
    return logits[keep], hidden[keep] if hidden is not None else None
