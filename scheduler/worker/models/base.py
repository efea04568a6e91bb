"""What a model is to the runner: token ids and paged-KV metadata in, hidden states out, logits
for the rows asked. Each architecture family is one file implementing this (llama.py)."""

from __future__ import annotations

from typing import Protocol

import torch


def head_dim(config) -> int:
    """Width of one attention head (a config's own head_dim, else hidden_size / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class CausalLMModel(Protocol):
    config: object  # the transformers config
    fused_ops: object | None  # set once the model runs through the fused CUDA kernels
    vocab_ids: torch.Tensor | None  # the tokens a restricted LM head computes logits for, else None
    tp: object  # its TensorParallel (scheduler/worker/parallel.py): rank, size and process group
    kv_heads: int  # KV heads this rank computes and caches

    def __init__(self, config, max_positions: int, tp=...) -> None: ...

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list,
                meta) -> torch.Tensor:
        """Hidden states [tokens, hidden] of the new tokens; their K and V written to kv_caches."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def greedy_token_ids(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def token_ids(self, columns: torch.Tensor) -> torch.Tensor:
        """Token ids of logits columns (a restricted head's columns are not token ids)."""

    def full_vocab_logits(self, logits: torch.Tensor) -> torch.Tensor: ...

    def restrict_vocab(self, token_ids: torch.Tensor) -> None: ...

    def use_fused_kernels(self) -> None: ...
