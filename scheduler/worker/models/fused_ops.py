"""Triton kernels for the CUDA path: residual add + RMSNorm, rotary + KV-cache write, SiLU * up.

Each replaces a handful of elementwise launches with one. They round where transformers
rounds (every bf16 op's result is stored in bf16 before the next), so they agree with the
eager torch ops within one bf16 rounding step (exp and rsqrt are the GPU's fast versions).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, res_out_ptr, eps, stride_x, stride_r,
                         stride_o, stride_ro, N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32))
        x = x.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """RMSNorm(x + residual) and x + residual; with no residual, RMSNorm(x) and x itself. x is [T, N]."""
    num_rows, n = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    _add_rms_norm_kernel[(num_rows,)](
        x, residual if residual is not None else x, weight, out, res_out, eps, x.stride(0),
        residual.stride(0) if residual is not None else 0, out.stride(0), res_out.stride(0),
        N=n, BLOCK=triton.next_power_of_2(n), HAS_RESIDUAL=residual is not None)
    return out, res_out


@triton.jit
def _rotate(x_ptr, stride_h, cos, sin, HEADS: tl.constexpr, HEADS_P: tl.constexpr, HALF: tl.constexpr,
            HALF_P: tl.constexpr):
    """Rotates [heads, 2*HALF] in place: x*cos + rotate_half(x)*sin, rounded as transformers does."""
    h = tl.arange(0, HEADS_P)
    j = tl.arange(0, HALF_P)
    ok = (h < HEADS)[:, None] & (j < HALF)[None, :]
    offs = stride_h * h[:, None] + j[None, :]
    x1 = tl.load(x_ptr + offs, mask=ok, other=0.0)
    x2 = tl.load(x_ptr + offs + HALF, mask=ok, other=0.0)
    dtype = x1.dtype
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    out1 = (x1f * cos).to(dtype).to(tl.float32) - (x2f * sin).to(dtype).to(tl.float32)
    out2 = (x2f * cos).to(dtype).to(tl.float32) + (x1f * sin).to(dtype).to(tl.float32)
    tl.store(x_ptr + offs, out1.to(dtype), mask=ok)
    tl.store(x_ptr + offs + HALF, out2.to(dtype), mask=ok)


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, positions_ptr, cos_ptr, sin_ptr, slots_ptr, k_cache_ptr, v_cache_ptr,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cache_slot,
                       stride_cache_head, stride_cos, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                       HEADS_P: tl.constexpr, KV_HEADS_P: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    j = tl.arange(0, HALF_P)
    half = j < HALF
    dtype = q_ptr.dtype.element_ty
    # transformers casts the fp32 tables to the activations' dtype before multiplying.
    cos = tl.load(cos_ptr + pos * stride_cos + j, mask=half, other=0.0).to(dtype).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cos + j, mask=half, other=0.0).to(dtype).to(tl.float32)[None, :]
    _rotate(q_ptr + t * stride_qt, stride_qh, cos, sin, NUM_HEADS, HEADS_P, HALF, HALF_P)
    _rotate(k_ptr + t * stride_kt, stride_kh, cos, sin, NUM_KV_HEADS, KV_HEADS_P, HALF, HALF_P)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot >= 0:  # padding tokens of a CUDA-graph batch have no slot
        h = tl.arange(0, KV_HEADS_P)
        d = tl.arange(0, 2 * HALF_P)
        ok = (h < NUM_KV_HEADS)[:, None] & (d < 2 * HALF)[None, :]
        k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=ok)
        v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=ok)
        cache_offs = slot * stride_cache_slot + h[:, None] * stride_cache_head + d[None, :]
        tl.store(k_cache_ptr + cache_offs, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
        tl.store(v_cache_ptr + cache_offs, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Rotates q [T, H, D] and k [T, KVH, D] in place and stores k and v at their cache slots
    (slot -1: not stored). Caches are [blocks, block_size, KVH, D], contiguous."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    half = head_dim // 2
    _rope_cache_kernel[(num_tokens,)](
        q, k, v, positions, cos, sin, slot_mapping, k_cache, v_cache, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), v.stride(0), v.stride(1), k_cache.stride(1), k_cache.stride(2), cos.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEADS_P=triton.next_power_of_2(num_heads),
        KV_HEADS_P=triton.next_power_of_2(num_kv_heads), HALF=half, HALF_P=triton.next_power_of_2(half))


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=ok, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_in + N + cols, mask=ok, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up], [T, 2I] -> [T, I]."""
    num_rows, width = gate_up.shape
    n = width // 2
    out = gate_up.new_empty(num_rows, n)
    block = min(1024, triton.next_power_of_2(n))
    _silu_mul_kernel[(num_rows, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), N=n,
                                                        BLOCK=block)
    return out
