"""The device lookup (ngram_device.py) as one Triton kernel for CUDA: a program per row walks its history in
blocks, each place's run of tokens agreeing with the tail counted back from it, and keeps the longest run, latest
first. One launch a step instead of some thirty small operations, which the host would pay for in launches."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lookup_kernel(history_ptr, row_stride, lengths_ptr, drafts_ptr, found_ptr, score_base,
                   K: tl.constexpr, K_BLOCK: tl.constexpr, N_MIN: tl.constexpr, N_MAX: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0)
    length = tl.load(lengths_ptr + row).to(tl.int32)  # loop bounds and places in int32, scores in int64
    base = history_ptr + row.to(tl.int64) * row_stride
    best = tl.zeros([], dtype=tl.int64) - 1
    for start in range(1, length, BLOCK):  # s: the place after a match, where its drafts start
        ends = start + tl.arange(0, BLOCK)
        usable = ends <= length - 1  # a match ends before the last token
        alive = usable
        run = tl.zeros([BLOCK], dtype=tl.int64)
        for j in tl.static_range(N_MAX):
            place = ends - 1 - j
            tail = length - 1 - j
            token = tl.load(base + place, mask=alive & (place >= 0), other=-1)
            wanted = tl.load(base + tail, mask=tail >= 0, other=-2)
            alive = alive & (place >= 0) & (token == wanted)
            run += alive.to(tl.int64)
        score = tl.where(usable & (run >= N_MIN), run * score_base + ends.to(tl.int64), -1)
        best = tl.maximum(best, tl.max(score, axis=0))
    match_end = best % score_base
    found = tl.where(best >= 0, tl.minimum(tl.maximum(length - match_end, 0), K), 0)
    offsets = tl.arange(0, K_BLOCK)
    drafts = tl.load(base + match_end + offsets, mask=offsets < found, other=0)
    tl.store(drafts_ptr + row * K + offsets, drafts.to(tl.int64), mask=offsets < K)
    tl.store(found_ptr + row, found)


def lookup(history: torch.Tensor, lengths: torch.Tensor, k: int, n_min: int,
           n_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """propose_ngram_on_device's answer (drafts [R, k] int64, num_found [R] int64) in one launch; history's rows
    must be contiguous."""
    assert history.stride(1) == 1
    num_rows = history.shape[0]
    drafts = torch.empty(num_rows, k, dtype=torch.long, device=history.device)
    found = torch.empty(num_rows, dtype=torch.long, device=history.device)
    if num_rows:
        _lookup_kernel[(num_rows,)](history, history.stride(0), lengths, drafts, found, history.shape[1] + 2,
                                    K=k, K_BLOCK=triton.next_power_of_2(k), N_MIN=max(n_min, 1), N_MAX=n_max,
                                    BLOCK=256)
    return drafts, found
