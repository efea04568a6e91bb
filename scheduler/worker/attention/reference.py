"""Pure-torch paged attention: correct on CPU and GPU, and the oracle for fused kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scheduler.worker.attention.metadata import AttentionMetadata


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' keys and values. Caches are [num_blocks, block_size, kv_heads, head_dim]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """Causal attention of each new token over its sequence's cached context. q is [T, heads, head_dim]."""
    out = torch.empty_like(q)
    d = meta.num_decodes
    if d:
        out[:d] = _attend(q[:d].unsqueeze(1), k_cache, v_cache, meta.block_tables[:d], meta.seq_lens[:d],
                          torch.ones(d, dtype=torch.long, device=q.device), meta.max_seq_len, scale).squeeze(1)
    if d < meta.seq_lens.shape[0]:
        starts = meta.query_start_loc[d:]
        query_lens = starts[1:] - starts[:-1]
        padded, seq_idx, pos_idx = _pad_queries(q[d:], query_lens, meta.max_query_len)  # decodes hold 1 token each
        res = _attend(padded, k_cache, v_cache, meta.block_tables[d:], meta.seq_lens[d:], query_lens,
                      meta.max_seq_len, scale)
        out[d:] = res[seq_idx, pos_idx]
    return out


def _pad_queries(q: torch.Tensor, query_lens: torch.Tensor, max_query_len: int):
    """[T, H, D] flat queries -> [B, max_query_len, H, D], plus the indices that undo it."""
    batch = query_lens.shape[0]
    seq_idx = torch.repeat_interleave(torch.arange(batch, device=q.device), query_lens)
    starts = torch.cumsum(query_lens, 0) - query_lens
    pos_idx = torch.arange(q.shape[0], device=q.device) - starts[seq_idx]
    padded = q.new_zeros(batch, max_query_len, *q.shape[1:])
    padded[seq_idx, pos_idx] = q
    return padded, seq_idx, pos_idx


def _attend(q, k_cache, v_cache, block_tables, seq_lens, query_lens, max_seq_len, scale):
    """q: [B, Q, H, D] queries whose last real one sits at position seq_len - 1."""
    batch, num_q, num_heads, head_dim = q.shape
    block_size = k_cache.shape[1]
    num_blocks = -(-max_seq_len // block_size)
    tables = block_tables[:, :num_blocks]
    keys = k_cache[tables].reshape(batch, num_blocks * block_size, -1, head_dim)
    values = v_cache[tables].reshape(batch, num_blocks * block_size, -1, head_dim)
    key_pos = torch.arange(num_blocks * block_size, device=q.device)
    query_pos = (seq_lens - query_lens).unsqueeze(1) + torch.arange(num_q, device=q.device)
    mask = key_pos.view(1, 1, -1) <= query_pos.unsqueeze(-1)  # [B, Q, L]; also hides slots past seq_len
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys.transpose(1, 2).to(q.dtype), values.transpose(1, 2).to(q.dtype),
        attn_mask=mask.unsqueeze(1), scale=scale, enable_gqa=keys.shape[2] != num_heads)
    return out.transpose(1, 2)
