"""Batch metadata for attention over a flattened, variable-length batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Describes a batch of B sequences whose new tokens are laid end to end (T tokens in all).

    Sequences with a single new token (decodes) come first: `num_decodes` of them, one token
    each. The rest are prefill chunks (or multi-token verification queries).
    """

    slot_mapping: torch.Tensor  # [T] cache slot (block_id * block_size + offset) of each new token
    query_start_loc: torch.Tensor  # [B + 1] offsets of each sequence's tokens in the flat batch
    seq_lens: torch.Tensor  # [B] context length after this step (cached + new tokens)
    block_tables: torch.Tensor  # [B, max_blocks] block ids, padded with 0
    num_decodes: int
    max_query_len: int  # over the non-decode sequences
    max_seq_len: int
