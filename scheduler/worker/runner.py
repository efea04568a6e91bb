"""Turns a scheduled step into tensors, runs the model over the paged KV cache, returns logits.

On CUDA the model runs through fused Triton kernels and, where a step's shape has one, replays a
CUDA graph captured at start-up (scheduler/worker/graphs.py); other steps run eagerly.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from scheduler.tensors import to_device
from scheduler.worker.attention import AttentionMetadata
from scheduler.worker.graphs import CudaGraphs
from scheduler.worker.models.base import CausalLMModel, head_dim
from scheduler.worker.packing import (
    ForwardItem,
    device_token_patch,
    fill_block_tables,
    logits_indices,
    positions_and_slots,
)
from scheduler.worker.parallel import max_kv_heads

__all__ = ["ForwardItem", "ModelRunner", "fused_kernels_available", "kv_bytes_per_block"]

log = logging.getLogger(__name__)


def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype, tp_size: int = 1) -> int:
    """Bytes of one block of this model's KV cache; under tensor parallelism, one rank's share."""
    kv_heads = max_kv_heads(config, tp_size)
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim(config)
    return per_token * block_size * torch.tensor([], dtype=dtype).element_size()


def fused_kernels_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        log.warning("triton is not installed: CUDA runs the reference attention, without CUDA graphs")
        return False
    return True


def kv_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed KV-cache tensor. On the CPU its pages come zeroed from the OS on first touch (numpy's
    calloc): torch.zeros would write the whole cache, 1 GiB by default, before the first request."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    num_bytes = int(np.prod(shape)) * dtype.itemsize
    return torch.from_numpy(np.zeros(num_bytes, dtype=np.uint8)).view(dtype).view(shape)


class ModelRunner:
    def __init__(self, model: CausalLMModel, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        config = model.config
        shape = (num_blocks, block_size, model.kv_heads, head_dim(config))
        self.model = model
        self.block_size = block_size
        self.device = device
        self.kv_caches = [(kv_zeros(shape, dtype, device), kv_zeros(shape, dtype, device))
                          for _ in range(config.num_hidden_layers)]
        self.fused = fused_kernels_available(device)
        if self.fused and model.fused_ops is None:
            model.use_fused_kernels()
        self.graphs: CudaGraphs | None = None
        self._packed_order: list[int] | None = None

    def capture_graphs(self, max_num_seqs: int, max_query_len: int, max_model_len: int,
                       max_batched_tokens: int = 0) -> None:
        """CUDA graphs for steps of up to max_num_seqs sequences of up to max_query_len new tokens each
        (1 for decodes; 1 + k when verifying k drafts), in batch-size buckets, and for steps with prompt
        chunks of up to max_batched_tokens tokens in all (0: none)."""
        assert self.fused, "CUDA graphs need the fused kernels"
        self.graphs = CudaGraphs(self.model, self.kv_caches, self.block_size, max_num_seqs, max_query_len,
                                 max_model_len, max_batched_tokens)

    @torch.inference_mode()
    def forward(self, items: list[ForwardItem], token_ids: torch.Tensor | None = None,
                device_tokens: torch.Tensor | None = None, with_hidden: bool = False):
        """Compute the items' new tokens into the KV cache in one pass. Returns fp32 logits for
        each item's last `num_logits` tokens, items in the order given: [sum num_logits, vocab];
        with_hidden, also the model's last hidden states at those rows: (logits, hidden).

        Tokens the device holds and the host has not learnt yet, so the host never waits for them:
        token_ids, for items of one token each (a draft pass feeding on the last one's output),
        replaces every item's token; device_tokens [rows, width] fills the trailing placeholders of
        items that name a device_row (drafts to verify)."""
        assert token_ids is None or all(len(it.token_ids) == 1 for it in items)
        self._packed_order = None  # the eager pass sets the order it packed the items in
        patch = None if device_tokens is None or self.graphs is None else self._patch(items, device_tokens)
        if self.graphs is not None and self.graphs.fits(items):
            hidden = self.graphs.replay(items, token_ids, patch)
        elif self.graphs is not None and token_ids is None and (bucket := self.graphs.mixed_bucket(items)):
            hidden = self.graphs.replay_mixed(items, bucket, patch)
            rows = logits_indices(np.fromiter((len(it.token_ids) for it in items), np.int64, len(items)),
                                   np.fromiter((it.num_logits for it in items), np.int64, len(items)))
            hidden = hidden[self._to_device(rows)]
        else:
            hidden = self._forward_eager(items, token_ids, device_tokens)
        logits = self.model.compute_logits(hidden).float()
        return (logits, hidden) if with_hidden else logits

    def aux_hidden_states(self, items: list[ForwardItem]) -> torch.Tensor:
        """After forward(items): the model's kept streams (CausalLM.keep_aux_hidden_states) at every new
        token of the items, in their order: [sum of len(token_ids), width]. A view of the model's buffer,
        which the next pass overwrites."""
        lens = [len(it.token_ids) for it in items]
        out = self.model.aux.out[:sum(lens)]
        order = self._packed_order
        if order is None or order == sorted(order):
            return out
        starts = np.cumsum([0] + [lens[i] for i in order])
        packed_at = {item: starts[pos] for pos, item in enumerate(order)}
        back = np.concatenate([np.arange(packed_at[i], packed_at[i] + lens[i]) for i in range(len(items))])
        return out[self._to_device(back.astype(np.int64))]

    def _patch(self, items: list[ForwardItem], device_tokens: torch.Tensor):
        """(destinations in the packed input, tokens) for the items' device-held tokens, or None."""
        where = device_token_patch(items, device_tokens.shape[1])
        if where is None:
            return None
        where = to_device(where, torch.long, self.device)
        return where[0], device_tokens.reshape(-1)[where[1]]

    @torch.inference_mode()
    def _forward_eager(self, items: list[ForwardItem], token_ids: torch.Tensor | None = None,
                       device_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states of the rows forward() returns logits for."""
        order = sorted(range(len(items)), key=lambda i: len(items[i].token_ids) != 1)  # decodes first
        input_ids, positions, meta, logit_rows = self._prepare([items[i] for i in order])
        if token_ids is not None:  # every item is a decode, so the order is the caller's
            input_ids = token_ids.to(input_ids.dtype)
        if device_tokens is not None and (patch := self._patch([items[i] for i in order], device_tokens)):
            input_ids.index_copy_(0, patch[0], patch[1].to(input_ids.dtype))
        hidden = self.model(input_ids, positions, self.kv_caches, meta)[logit_rows]
        self._packed_order = order
        if order == sorted(order):
            return hidden
        # Rows come out in the sorted order; hand them back in the caller's.
        row_starts = np.cumsum([0] + [items[i].num_logits for i in order])
        sorted_pos = {item: pos for pos, item in enumerate(order)}
        back = np.concatenate([np.arange(row_starts[sorted_pos[i]], row_starts[sorted_pos[i]] + items[i].num_logits)
                               for i in range(len(items))]).astype(np.int64)
        return hidden[self._to_device(back)]

    def _prepare(self, items: list[ForwardItem]):
        bs = self.block_size
        query_lens = np.array([len(it.token_ids) for it in items], dtype=np.int64)
        starts = np.array([it.start for it in items], dtype=np.int64)
        seq_lens = starts + query_lens
        query_start_loc = np.concatenate(([0], np.cumsum(query_lens)))
        block_tables = np.zeros((len(items), max(len(it.block_table) for it in items)), dtype=np.int64)
        fill_block_tables(block_tables, items)
        positions, slot_mapping = positions_and_slots(query_lens, query_start_loc, starts, block_tables, bs)
        input_ids = np.fromiter((t for it in items for t in it.token_ids), dtype=np.int64,
                                count=int(query_start_loc[-1]))
        logit_rows = logits_indices(query_lens, np.array([it.num_logits for it in items], dtype=np.int64))
        num_decodes = int((query_lens == 1).sum())  # all at the front
        non_decode_lens = query_lens[num_decodes:]
        to_dev = self._to_device
        meta = AttentionMetadata(
            slot_mapping=to_dev(slot_mapping), query_start_loc=to_dev(query_start_loc), seq_lens=to_dev(seq_lens),
            block_tables=to_dev(block_tables), num_decodes=num_decodes,
            max_query_len=int(non_decode_lens.max()) if len(non_decode_lens) else 1, max_seq_len=int(seq_lens.max()))
        return to_dev(input_ids), to_dev(positions), meta, to_dev(logit_rows)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)
