"""Prompt lookup: propose what followed the most recent earlier occurrence of the sequence's tail."""

from __future__ import annotations

import numpy as np


def propose_ngram(token_ids: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens. Tries the longest tail first (n_max tokens), down to n_min."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        # Every window of n tokens that ends before the last token, so the tail can't match itself.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
        hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + k].tolist()
    return []
