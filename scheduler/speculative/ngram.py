"""Prompt lookup: propose what followed the most recent earlier occurrence of the sequence's tail."""

from __future__ import annotations

import numpy as np


def propose_ngram(token_ids: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens after the latest earlier place where the longest tail (n_max tokens down
    to n_min) occurred. One pass over the history finds where the last token occurs; only those
    places are extended backwards, so a step costs little even for long histories."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    last = len(tokens) - 1
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])  # where a match could end; never the tail itself
    if ends.size == 0:
        return []
    match_len = np.ones(ends.size, dtype=np.int64)
    for j in range(1, min(n_max, last)):
        earlier = ends - j
        extends = (match_len == j) & (earlier >= 0)
        extends[extends] = tokens[earlier[extends]] == tokens[last - j]
        match_len += extends
    best = match_len.max()
    if best < n_min:
        return []
    end = int(ends[np.flatnonzero(match_len == best)[-1]])
    return tokens[end + 1:end + 1 + k].tolist()
