"""Our own forward for the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM) over a paged KV cache.

Parameter names match the Hugging Face checkpoints, so a transformers state dict loads as is.
Under tensor parallelism (scheduler/worker/parallel.py) each rank builds the same modules at its
shard's sizes: q/k/v and gate/up split by heads or columns, o_proj and down_proj by rows with one
all-reduce after each, the embedding and LM head by vocabulary rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scheduler.worker.attention import AttentionMetadata, paged_attention, write_kv
from scheduler.worker.models.base import head_dim
from scheduler.worker.parallel import (
    SINGLE,
    ParallelLMHead,
    RowParallelLinear,
    TensorParallel,
    VocabParallelEmbedding,
    local_heads,
)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same arithmetic as transformers (normalise in fp32, cast back, then scale) for exact parity.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to max_positions, computed once."""

    def __init__(self, config, max_positions: int):
        super().__init__()
        # A model built on the meta device gets its tables computed on the CPU: meta's reference
        # arange would import torch._dynamo, half a second of every start.
        device = torch.get_default_device()
        compute_on = torch.device("cpu") if device.type == "meta" else device
        inv_freq, attention_scaling = rope_parameters(config, compute_on)
        positions = torch.arange(max_positions, dtype=torch.float32, device=compute_on)
        freqs = torch.outer(positions, inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", (emb.cos() * attention_scaling).to(device), persistent=False)
        self.register_buffer("sin", (emb.sin() * attention_scaling).to(device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope_parameters(config, device: torch.device) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, as transformers' LlamaRotaryEmbedding computes them.
    Its scaled RoPE types come from transformers' table; the default type is its one-line formula,
    repeated here because importing modeling_llama for it costs ~0.9 s of every start."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = config.rope_parameters["rope_type"]
    if rope_type != "default":
        return ROPE_INIT_FUNCTIONS[rope_type](config, device=device)
    base = config.rope_parameters["rope_theta"]
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim)), 1.0


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config, qk_norm: bool, tp: TensorParallel):
        super().__init__()
        self.num_heads, self.num_kv_heads = local_heads(config, tp)
        self.head_dim = head_dim(config)
        self.scale = self.head_dim**-0.5
        bias = getattr(config, "attention_bias", False) or config.model_type == "qwen2"
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = RowParallelLinear(self.num_heads * self.head_dim, hidden, getattr(config, "attention_bias", False)
                                        and config.model_type != "qwen2", tp)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None

    def forward(self, x, positions, rotary, kv_cache, meta: AttentionMetadata):
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        k_cache, v_cache = kv_cache
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        out = paged_attention(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(num_tokens, -1))

    def fuse_projections(self) -> None:
        """One q/k/v matmul instead of three, for the fused path."""
        self.qkv_proj = _concat_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward_fused(self, x, positions, rotary, kv_cache, meta: AttentionMetadata, ops):
        num_tokens = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        k_cache, v_cache = kv_cache
        ops.rope_and_cache(q, k, v, positions, rotary.cos, rotary.sin, k_cache, v_cache, meta.slot_mapping)
        out = ops.paged_attention(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.view(num_tokens, -1))


class MLP(nn.Module):
    def __init__(self, config, tp: TensorParallel):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        share = config.intermediate_size // tp.size
        self.gate_proj = nn.Linear(config.hidden_size, share, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, share, bias=bias)
        self.down_proj = RowParallelLinear(share, config.hidden_size, bias, tp)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def fuse_projections(self) -> None:
        self.gate_up_proj = _concat_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward_fused(self, x, ops):
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))


def _concat_linears(linears: list[nn.Linear]) -> nn.Linear:
    first = linears[0]
    weight = torch.cat([lin.weight for lin in linears])
    fused = nn.Linear(first.in_features, weight.shape[0], bias=first.bias is not None, device=weight.device,
                      dtype=weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if first.bias is not None:
            fused.bias.copy_(torch.cat([lin.bias for lin in linears]))
    return fused


class DecoderLayer(nn.Module):
    def __init__(self, config, qk_norm: bool, tp: TensorParallel):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, qk_norm, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, tp)

    def forward(self, x, positions, rotary, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), positions, rotary, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config, max_positions: int, qk_norm: bool, tp: TensorParallel):
        super().__init__()
        # No random init: the loader assigns the checkpoint's table (or a seeded dummy one), and on the meta
        # device Embedding's own normal_ would import torch._dynamo, half a second of every start.
        self.embed_tokens = VocabParallelEmbedding(config, tp)
        self.layers = nn.ModuleList(DecoderLayer(config, qk_norm, tp) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config, max_positions)

    def forward(self, input_ids, positions, kv_caches, meta, aux: AuxHiddenStates | None = None):
        x = self.embed_tokens(input_ids)
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            x = layer(x, positions, self.rotary, kv_cache, meta)
            if aux is not None:
                aux.keep(i, x)
        return self.norm(x)

    def forward_fused(self, input_ids, positions, kv_caches, meta, ops, aux: AuxHiddenStates | None = None):
        """The same computation through the Triton kernels: the residual stream is carried beside the
        hidden states so each add meets the next norm in one kernel."""
        x, residual = self.embed_tokens(input_ids), None
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            h, residual = ops.add_rms_norm(x, residual, layer.input_layernorm.weight, layer.input_layernorm.eps)
            x = layer.self_attn.forward_fused(h, positions, self.rotary, kv_cache, meta, ops)
            norm = layer.post_attention_layernorm
            h, residual = ops.add_rms_norm(x, residual, norm.weight, norm.eps)
            x = layer.mlp.forward_fused(h, ops)
            if aux is not None:
                aux.keep(i, x + residual)  # the residual stream after layer i
        return ops.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]


class AuxHiddenStates:
    """The residual streams after some layers (an EAGLE head's input), kept in one buffer that outlives
    the pass: row r of `out` [max_tokens, len(layer_ids) * hidden] is the pass's packed token r, the
    streams concatenated in layer_ids' order. A fixed buffer, so CUDA graphs captured with it write it too."""

    def __init__(self, layer_ids: list[int], max_tokens: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device):
        self.layer_ids = list(layer_ids)
        self.out = torch.zeros(max_tokens, len(layer_ids) * hidden_size, dtype=dtype, device=device)
        self.hidden_size = hidden_size

    def keep(self, layer: int, stream: torch.Tensor) -> None:
        h = self.hidden_size
        for j, wanted in enumerate(self.layer_ids):
            if wanted == layer:
                self.out[:stream.shape[0], j * h:(j + 1) * h].copy_(stream)


def _split_into(state: dict, merged: str, parts: tuple[str, ...], sizes: list[int]) -> None:
    parent = merged.rsplit(".", 1)[0]
    for suffix in ("weight", "bias"):
        tensor = state.pop(f"{merged}.{suffix}", None)
        if tensor is not None:
            for part, piece in zip(parts, tensor.split(sizes)):
                state[f"{parent}.{part}.{suffix}"] = piece


@dataclass(frozen=True)
class _FusedOps:
    add_rms_norm: Callable
    rope_and_cache: Callable
    silu_mul: Callable
    paged_attention: Callable


def load_fused_ops() -> _FusedOps:
    """The Triton kernels (CUDA only) a fused forward runs through."""
    from scheduler.worker.attention.fused import paged_attention as fused_paged_attention
    from scheduler.worker.models import fused_ops

    return _FusedOps(fused_ops.add_rms_norm, fused_ops.rope_and_cache, fused_ops.silu_mul, fused_paged_attention)


class CausalLM(nn.Module):
    """Token ids + paged-KV metadata in, hidden states out; logits only for the rows asked."""

    def __init__(self, config, max_positions: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.config = config
        self.tp = tp
        self.kv_heads = local_heads(config, tp)[1]  # KV heads this rank holds
        self.model = Backbone(config, max_positions, qk_norm=config.model_type == "qwen3", tp=tp)
        self.lm_head = ParallelLMHead(config, tp)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
        self.fused_ops = None  # set by use_fused_kernels()
        self.vocab_ids: torch.Tensor | None = None  # set by restrict_vocab()
        self.aux: AuxHiddenStates | None = None  # set by keep_aux_hidden_states()

    def keep_aux_hidden_states(self, layer_ids: list[int], max_tokens: int) -> AuxHiddenStates:
        """From now on every pass also writes the residual streams after these layers into one buffer
        (AuxHiddenStates.out) of rows for up to max_tokens tokens: what an EAGLE head drafts from."""
        weight = self.model.embed_tokens.weight
        self.aux = AuxHiddenStates(layer_ids, max_tokens, self.config.hidden_size, weight.dtype, weight.device)
        return self.aux

    def restrict_vocab(self, token_ids: torch.Tensor) -> None:
        """Compute logits over these token ids only (a draft's frequent tokens): the LM head keeps
        their rows, and logits column i stands for token_ids[i]. The embeddings keep every token."""
        token_ids = token_ids.to(device=self.lm_head.weight.device, dtype=torch.long)
        head = nn.Linear(self.config.hidden_size, len(token_ids), bias=False, device="meta")
        head.weight = nn.Parameter(self.lm_head.weight.detach()[token_ids], requires_grad=False)
        self.lm_head, self.vocab_ids = head, token_ids

    def use_fused_kernels(self) -> None:
        """Run through the Triton kernels (CUDA only) from now on; merges q/k/v and gate/up weights."""
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()
        self.fused_ops = load_fused_ops()

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under transformers' names, with merged projections split back."""
        state = dict(self.state_dict())
        for i, layer in enumerate(self.model.layers):
            attn, prefix = layer.self_attn, f"model.layers.{i}."
            if hasattr(attn, "qkv_proj"):
                kv = attn.num_kv_heads * attn.head_dim
                _split_into(state, prefix + "self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj"),
                            [attn.num_heads * attn.head_dim, kv, kv])
            if hasattr(layer.mlp, "gate_up_proj"):
                half = layer.mlp.gate_up_proj.out_features // 2
                _split_into(state, prefix + "mlp.gate_up_proj", ("gate_proj", "up_proj"), [half, half])
        return state

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        if self.fused_ops is not None:
            return self.model.forward_fused(input_ids, positions, kv_caches, meta, self.fused_ops, self.aux)
        return self.model(input_ids, positions, kv_caches, meta, self.aux)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the model's vocabulary, or over vocab_ids once restricted."""
        return self.lm_head(hidden)

    def greedy_token_ids(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.token_ids(self.compute_logits(hidden).argmax(dim=-1))

    def token_ids(self, columns: torch.Tensor) -> torch.Tensor:
        """Token ids of logits columns."""
        return columns if self.vocab_ids is None else self.vocab_ids[columns]

    def full_vocab_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary: -inf for tokens a restricted model never proposes."""
        if self.vocab_ids is None:
            return logits
        full = logits.new_full((logits.shape[0], self.config.vocab_size), float("-inf"))
        return full.index_copy_(1, self.vocab_ids, logits)
