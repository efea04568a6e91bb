"""Tensor parallelism inside one model: which slice of each weight a rank holds, and the layers whose
outputs need a collective. q/k/v and gate/up are split by heads or columns (each rank computes its own
heads and its share of the MLP); o_proj and down_proj by rows, with one all-reduce after each; the
embedding and the LM head by vocabulary rows (an all-reduce after the lookup, an all-gather of the
logits). KV heads are split across ranks, or replicated when there are fewer KV heads than ranks.

A process group here is a torch.distributed backend object (ProcessGroupGloo, ProcessGroupNCCL) built
from its own store, not the process-wide default group: two engines may live in one process."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TensorParallel:
    rank: int
    size: int
    group: object | None = None  # None only when size == 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            self.group.allreduce([x]).wait()
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' x side by side along the last dimension, rank 0's first."""
        return self._gather(x, -1)

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' x stacked along the first dimension, rank 0's first."""
        return self._gather(x, 0)

    def _gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.group.allgather([parts], [x.contiguous()]).wait()
        return torch.cat(parts, dim=dim)


SINGLE = TensorParallel(0, 1)


def check_divisible(config, size: int) -> None:
    """ValueError naming what does not split across `size` ranks."""
    if size == 1:
        return
    problems = []
    if config.num_attention_heads < size:
        problems.append(f"num_attention_heads {config.num_attention_heads} (fewer than the ranks)")
    if config.intermediate_size % size:
        problems.append(f"intermediate_size {config.intermediate_size} (not divisible)")
    if problems:
        raise ValueError(f"tensor_parallel_size {size} does not fit the model's {', '.join(problems)}")


def query_heads(config, tp: TensorParallel) -> tuple[int, int]:
    """[first, end) of the query heads this rank computes: a balanced split (5 and 4 of 9 on 2 ranks)."""
    heads = config.num_attention_heads
    return tp.rank * heads // tp.size, (tp.rank + 1) * heads // tp.size


def kv_head_ids(config, tp: TensorParallel) -> list[int]:
    """The KV heads this rank holds, in order. Its query heads must read them in equal groups, as the
    attention kernels expect: when the heads split evenly, each rank holds the KV heads of its query
    heads (a KV head shared by ranks is replicated on each); when they do not (9 query and 3 KV heads on
    2 ranks), each query head gets its own copy of its KV head."""
    first, end = query_heads(config, tp)
    group = config.num_attention_heads // config.num_key_value_heads
    per_query = [head // group for head in range(first, end)]
    ids = sorted(set(per_query))
    if all(per_query.count(i) == len(per_query) // len(ids) for i in ids) and len(per_query) % len(ids) == 0:
        return ids
    return per_query


def local_heads(config, tp: TensorParallel) -> tuple[int, int]:
    """(query heads, KV heads) one rank computes."""
    first, end = query_heads(config, tp)
    return end - first, len(kv_head_ids(config, tp))


def max_kv_heads(config, size: int) -> int:
    """The most KV heads any of `size` ranks holds (what a block's bytes are planned for)."""
    return max(local_heads(config, TensorParallel(rank, size))[1] for rank in range(size))


def vocab_rows(config, tp: TensorParallel) -> tuple[int, int]:
    """[start, end) of the vocabulary rows this rank holds; every rank holds the same number of rows,
    the last padded with zeros past the vocabulary."""
    per_rank = -(-config.vocab_size // tp.size)
    return tp.rank * per_rank, (tp.rank + 1) * per_rank


def shard_of(name: str, tensor, config, tp: TensorParallel) -> torch.Tensor:
    """This rank's slice of the full checkpoint tensor `name` (transformers' names), a tensor of its own
    (not a view keeping the whole alive). `tensor` may be a lazy slice (safetensors' get_slice) so that
    only the shard is read."""
    if tp.size == 1:
        return tensor[:] if not isinstance(tensor, torch.Tensor) else tensor
    shard = _shard(name, tensor, config, tp)
    return shard.clone() if isinstance(tensor, torch.Tensor) else shard


def _shard(name: str, tensor, config, tp: TensorParallel) -> torch.Tensor:
    from scheduler.worker.models.base import head_dim  # models/ imports this module

    head = head_dim(config)
    first, end = query_heads(config, tp)
    part = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else name
    is_weight = name.endswith(".weight")
    if part == "q_proj":
        return _rows(tensor, first * head, (end - first) * head)
    if part in ("k_proj", "v_proj"):
        ids = kv_head_ids(config, tp)
        rows = _rows(tensor, ids[0] * head, (ids[-1] + 1 - ids[0]) * head)
        if ids == list(range(ids[0], ids[-1] + 1)):
            return rows
        picked = torch.tensor([i - ids[0] for i in ids])
        return rows.unflatten(0, (-1, head))[picked].flatten(0, 1)
    if part == "o_proj" and is_weight:
        return _columns(tensor, first * head, (end - first) * head)
    share = config.intermediate_size // tp.size
    if part in ("gate_proj", "up_proj"):
        return _rows(tensor, tp.rank * share, share)
    if part == "down_proj" and is_weight:
        return _columns(tensor, tp.rank * share, share)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        start, end = vocab_rows(config, tp)
        rows = _rows(tensor, start, max(0, min(end, config.vocab_size) - start))
        return F.pad(rows, (0, 0, 0, end - start - rows.shape[0])) if rows.shape[0] < end - start else rows
    return tensor[:]  # norms and row-parallel biases: whole


def _rows(tensor, start: int, count: int) -> torch.Tensor:
    return tensor[start:start + count]


def _columns(tensor, start: int, count: int) -> torch.Tensor:
    return tensor[:, start:start + count]


class RowParallelLinear(nn.Linear):
    """A linear layer over this rank's input columns; the partial outputs are summed across ranks,
    then the (whole) bias added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel):
        super().__init__(in_features, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(x)
        out = self.tp.all_reduce(F.linear(x, self.weight))
        return out + self.bias if self.bias is not None else out


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows of the embedding table; a token another rank holds looks up zeros here, and
    the all-reduce brings every token its row."""

    def __init__(self, config, tp: TensorParallel):
        self.tp, self.vocab_start = tp, vocab_rows(config, tp)[0]
        rows = vocab_rows(config, tp)[1] - self.vocab_start
        super().__init__(rows, config.hidden_size, _weight=torch.empty(rows, config.hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(input_ids)
        local = input_ids - self.vocab_start
        held = (local >= 0) & (local < self.num_embeddings)
        x = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight) * held.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(x)


CPU_FEW_ROWS = 8  # up to this many rows of logits, the CPU computes them as table @ hidden.T


class ParallelLMHead(nn.Linear):
    """Logits for this rank's vocabulary rows, gathered into the whole vocabulary on every rank."""

    def __init__(self, config, tp: TensorParallel):
        start, end = vocab_rows(config, tp)
        super().__init__(config.hidden_size, end - start, bias=False)
        self.tp, self.vocab_size = tp, config.vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            if hidden.device.type == "cpu" and hidden.dim() == 2 and 1 < len(hidden) <= CPU_FEW_ROWS:
                # A few rows (a verification's): on the CPU, the product with the table as the left operand
                # reads it at memory speed, where F.linear took twice as long (bench/results/speculative_eagle_cpu.md).
                return torch.mm(self.weight, hidden.T).T.contiguous()
            return super().forward(hidden)
        return self.tp.all_gather_last(super().forward(hidden))[..., :self.vocab_size]
