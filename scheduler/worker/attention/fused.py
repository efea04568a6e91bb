"""Fused paged attention for CUDA, in Triton: one kernel for every query shape in a mixed batch.

A program owns one sequence, one tile of its query tokens and one KV head. Rows of its query
tile are (token, query head of that KV head's group) pairs, so grouped-query attention reads
each K/V block once per group. It walks the sequence's block table to the last key its tile
may see, with an online softmax, so prefill chunks, single decode tokens and 1+k
verification queries are all the same loop. The grid depends only on the number of
sequences and the longest query, never on context lengths, so a CUDA graph can hold it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from scheduler.worker.attention.metadata import AttentionMetadata

KEYS_PER_ITERATION = 64


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, query_start_loc_ptr, seq_lens_ptr, block_tables_ptr, scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    first = tl.program_id(1) * BLOCK_Q
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if first < q_len:
        context = tl.load(seq_lens_ptr + seq) - q_len  # tokens cached before this step's first query
        rows = tl.arange(0, BLOCK_M)
        tok = first + rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
        dims = tl.arange(0, HEAD_DIM_P)
        dim_ok = dims < HEAD_DIM
        q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        q_pos = context + tok
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
        num_keys = context + tl.minimum(first + BLOCK_Q, q_len)  # up to the tile's last query, inclusive
        offs_n = tl.arange(0, BLOCK_N)
        for start_n in range(0, num_keys, BLOCK_N):
            key_pos = start_n + offs_n
            key_ok = key_pos < num_keys
            block = tl.load(block_tables_ptr + seq * stride_bt + key_pos // BLOCK_SIZE, mask=key_ok, other=0)
            block = block.to(tl.int64)
            slot = key_pos % BLOCK_SIZE
            k = tl.load(k_cache_ptr + block[None, :] * stride_kb + slot[None, :] * stride_ks + kv_head * stride_kh
                        + dims[:, None], mask=key_ok[None, :] & dim_ok[:, None], other=0.0)
            s = tl.dot(q, k, input_precision=PRECISION) * scale
            s = tl.where((key_pos[None, :] <= q_pos[:, None]) & key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padding rows see no key at all
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_cache_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh
                        + dims[None, :], mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as the reference: q [T, heads, head_dim], caches [blocks, block_size, kv_heads, head_dim].
    meta.query_start_loc, seq_lens and block_tables may be int32 or int64."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q) if out is None else out
    # Decode-shaped launches use 16 rows; longer queries 64 rows, so a tile holds several tokens.
    block_m = 16 if meta.max_query_len * group <= 16 else 64
    block_m = max(block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    num_seqs = meta.query_start_loc.shape[0] - 1
    grid = (num_seqs, triton.cdiv(meta.max_query_len, block_q), num_kv_heads)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), meta.block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_P=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=KEYS_PER_ITERATION,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
