"""Prompt lookup on the device: propose_ngram (ngram.py) for every row of a token history at once, so drafts
for a step come from the step before's tokens without the host reading them."""

from __future__ import annotations

import torch


def propose_ngram_on_device(history: torch.Tensor, lengths: torch.Tensor, k: int, n_min: int,
                            n_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """history [R, L]: each row's tokens, the first lengths[r] of them real (the rest is read as nothing).
    Returns (drafts [R, k], num_found [R]): row r's drafts are the tokens after the latest earlier place where
    its longest tail (n_max tokens down to n_min) occurred, drafts[r, :num_found[r]] (0 where none was found).
    The same drafts as propose_ngram: a match ends before the last token, the longest tail wins, then the
    latest place. Every tail length is one comparison over all windows: no step waits for the host."""
    num_rows, width = history.shape
    device = history.device
    match_end = torch.full((num_rows,), -1, dtype=torch.long, device=device)
    for n in range(min(n_max, width - 1), max(n_min, 1) - 1, -1):
        tail = history.gather(1, (lengths.unsqueeze(1) - n + torch.arange(n, device=device)).clamp(min=0))
        hits = (history.unfold(1, n, 1) == tail.unsqueeze(1)).all(dim=2)  # [R, width - n + 1]
        starts = torch.arange(width - n + 1, device=device)
        hits &= starts.unsqueeze(0) <= (lengths - 1 - n).unsqueeze(1)  # ends before the last token
        latest = torch.where(hits, starts.unsqueeze(0), -1).amax(dim=1)
        match_end = torch.where((match_end < 0) & (latest >= 0), latest + n, match_end)
    num_found = torch.where(match_end >= 0, (lengths - match_end).clamp(min=0, max=k), 0)
    columns = (match_end.clamp(min=0).unsqueeze(1) + torch.arange(k, device=device)).clamp(max=width - 1)
    drafts = history.gather(1, columns)
    return drafts.masked_fill(torch.arange(k, device=device).unsqueeze(0) >= num_found.unsqueeze(1), 0), num_found
