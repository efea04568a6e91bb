"""Turns a scheduled step into tensors, runs the model over the paged KV cache, returns logits.

On CUDA the model runs through fused Triton kernels and, where a step's shape has one, replays a
CUDA graph captured at start-up (scheduler/worker/graphs.py); other steps run eagerly.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from scheduler.sampling.sampler import to_device
from scheduler.worker.attention import AttentionMetadata
from scheduler.worker.graphs import CudaGraphs
from scheduler.worker.models.llama import CausalLM
from scheduler.worker.packing import (
    ForwardItem,
    device_token_patch,
    fill_block_tables,
    logits_indices,
    positions_and_slots,
)

__all__ = ["ForwardItem", "ModelRunner", "fused_kernels_available", "kv_bytes_per_block"]

log = logging.getLogger(__name__)


def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
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


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (num_blocks, block_size, config.num_key_value_heads, head_dim)
        self.model = model
        self.block_size = block_size
        self.device = device
        def zeros():
            return torch.zeros(shape, dtype=dtype, device=device)

        self.kv_caches = [(zeros(), zeros()) for _ in range(config.num_hidden_layers)]
        self.fused = fused_kernels_available(device)
        if self.fused and model.fused_ops is None:
            model.use_fused_kernels()
        self.graphs: CudaGraphs | None = None

    def capture_graphs(self, max_num_seqs: int, max_query_len: int, max_model_len: int, max_chain: int = 0,
                       max_batched_tokens: int = 0, proposals: bool = False) -> None:
        """CUDA graphs for steps of up to max_num_seqs sequences of up to max_query_len new tokens each
        (1 for decodes; 1 + k when verifying k drafts), in batch-size buckets; for steps with prompt
        chunks of up to max_batched_tokens tokens in all (0: none); and, for a draft model, greedy
        chains of 1..max_chain decode passes (see greedy_chain) and, with proposals, whole greedy
        proposals of 1..max_chain + 1 tokens (see greedy_proposal)."""
        assert self.fused, "CUDA graphs need the fused kernels"
        self.graphs = CudaGraphs(self, max_num_seqs, max_query_len, max_model_len, max_chain, max_batched_tokens,
                                 proposals)

    @torch.inference_mode()
    def greedy_proposal(self, items: list[ForwardItem], passes: int) -> torch.Tensor | None:
        """A draft model's greedy proposal as one CUDA graph replay: a catch-up pass over the items (up
        to max_query_len tokens each), then `passes` greedy decode passes, each feeding its argmax to
        the next. Returns the argmax tokens [len(items), 1 + passes] on the device: column 0 follows
        each item's last token. None where no graph holds these items."""
        graphs = self.graphs
        if graphs is None or not 0 <= passes <= graphs.proposal_passes or len(items) > graphs.sizes[-1]:
            return None
        bs = self.block_size
        if not all(len(it.token_ids) <= graphs.max_query_len and -(-(it.start + len(it.token_ids) + passes) // bs)
                   <= len(it.block_table) <= graphs.width for it in items):
            return None
        return graphs.replay_proposal(items, passes)

    @torch.inference_mode()
    def greedy_chain(self, items: list[ForwardItem], token_ids: torch.Tensor, passes: int) -> torch.Tensor | None:
        """`passes` greedy decode passes in a row, each feeding its argmax tokens to the next, as one
        CUDA graph replay: the host prepares the first pass only (items of one placeholder token each,
        their tokens in token_ids on the device); pass j computes position start + j of every item.
        Returns the argmax tokens [passes, len(items)] on the device, or None where no graph holds
        these items (no graphs, too many sequences, too long, or a pass would leave its KV blocks)."""
        if self.graphs is None or len(items) > self.graphs.sizes[-1] or not 1 <= passes <= self.graphs.max_chain:
            return None
        bs = self.block_size
        if not all(len(it.token_ids) == it.num_logits == 1 and -(-(it.start + passes) // bs) <= len(it.block_table)
                   <= self.graphs.width for it in items):
            return None
        return self.graphs.replay_chain(items, token_ids, passes)

    @torch.inference_mode()
    def forward(self, items: list[ForwardItem], token_ids: torch.Tensor | None = None,
                device_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the items' new tokens into the KV cache in one pass. Returns fp32 logits for
        each item's last `num_logits` tokens, items in the order given: [sum num_logits, vocab].

        Tokens the device holds and the host has not learnt yet, so the host never waits for them:
        token_ids, for items of one token each (a draft pass feeding on the last one's output),
        replaces every item's token; device_tokens [rows, width] fills the trailing placeholders of
        items that name a device_row (drafts to verify)."""
        assert token_ids is None or all(len(it.token_ids) == 1 for it in items)
        patch = None if device_tokens is None else self._patch(items, device_tokens)
        if self.graphs is not None and self.graphs.fits(items):
            return self.model.compute_logits(self.graphs.replay(items, token_ids, patch)).float()
        if self.graphs is not None and token_ids is None and (bucket := self.graphs.mixed_bucket(items)):
            hidden = self.graphs.replay_mixed(items, bucket, patch)
            rows = logits_indices(np.fromiter((len(it.token_ids) for it in items), np.int64, len(items)),
                                   np.fromiter((it.num_logits for it in items), np.int64, len(items)))
            return self.model.compute_logits(hidden[self._to_device(rows)]).float()
        return self._forward_eager(items, token_ids, device_tokens)

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
        order = sorted(range(len(items)), key=lambda i: len(items[i].token_ids) != 1)  # decodes first
        input_ids, positions, meta, logit_rows = self._prepare([items[i] for i in order])
        if token_ids is not None:  # every item is a decode, so the order is the caller's
            input_ids = token_ids.to(input_ids.dtype)
        if device_tokens is not None and (patch := self._patch([items[i] for i in order], device_tokens)):
            input_ids.index_copy_(0, patch[0], patch[1].to(input_ids.dtype))
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        logits = self.model.compute_logits(hidden[logit_rows]).float()
        if order == sorted(order):
            return logits
        # Rows come out in the sorted order; hand them back in the caller's.
        row_starts = np.cumsum([0] + [items[i].num_logits for i in order])
        sorted_pos = {item: pos for pos, item in enumerate(order)}
        back = np.concatenate([np.arange(row_starts[sorted_pos[i]], row_starts[sorted_pos[i]] + items[i].num_logits)
                               for i in range(len(items))]).astype(np.int64)
        return logits[self._to_device(back)]

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
