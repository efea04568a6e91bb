"""Prompt lookup on the device: propose_ngram (ngram.py) for every row of a token history at once, so drafts
for a step come from the step before's tokens without the host reading them."""

from __future__ import annotations

import torch


def propose_ngram_on_device(history: torch.Tensor, lengths: torch.Tensor, k: int, n_min: int,
                            n_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """history [R, L]: each row's tokens, the first lengths[r] of them real (the rest is read as nothing).
    Returns (drafts [R, k], num_found [R]): row r's drafts are the tokens after the latest earlier place where
    its longest tail (n_max tokens down to n_min) occurred, drafts[r, :num_found[r]] (0 past them). The same
    drafts as propose_ngram: a match ends before the last token, the longest tail wins, then the latest place.

    One pass serves every tail length: for each place, how many tokens ending there agree with the tail
    (counted back from its last, up to n_max), then the longest run, latest first. A fixed count of device
    operations, whatever the lengths: nothing waits for the host."""
    num_rows, width = history.shape
    device = history.device
    # n_max ids of -1 in front: a tail shorter than n_max (a short history) holds them, and no token matches them.
    padded = torch.nn.functional.pad(history, (n_max, 0), value=-1)
    tail = padded.gather(1, lengths.unsqueeze(1) + torch.arange(n_max, device=device))
    # Window s covers tokens s - n_max .. s - 1: the run of tokens agreeing with the tail that ends at s - 1.
    agree = padded.unfold(1, n_max, 1) == tail.unsqueeze(1)  # [R, L + 1, n_max]
    run = agree.flip(2).cumprod(dim=2, dtype=torch.int32).sum(dim=2)
    ends = torch.arange(width + 1, device=device)  # s: the place after the match, where the drafts start
    usable = (ends >= 1) & (ends.unsqueeze(0) <= (lengths - 1).unsqueeze(1)) & (run >= max(n_min, 1))
    best = torch.where(usable, run * (width + 2) + ends, -1).amax(dim=1)
    match_end = best % (width + 2)
    num_found = torch.where(best >= 0, (lengths - match_end).clamp(min=0, max=k), 0)
    positions = torch.arange(k, device=device)
    drafts = history.gather(1, (match_end.unsqueeze(1) + positions).clamp(max=width - 1))
    return drafts.masked_fill(positions.unsqueeze(0) >= num_found.unsqueeze(1), 0), num_found
