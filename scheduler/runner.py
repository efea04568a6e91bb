"""Turns a scheduled step into tensors, runs the model over the paged KV cache, returns logits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from scheduler.attention import AttentionMetadata
from scheduler.models.llama import CausalLM


@dataclass
class ForwardItem:
    """One sequence's part of a forward pass."""

    token_ids: list[int]  # the new tokens to compute
    start: int  # position of the first of them: the tokens already in the cache
    block_table: list[int]
    num_logits: int  # logits wanted for this many trailing tokens (0 = none)


def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
    return per_token * block_size * torch.tensor([], dtype=dtype).element_size()


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

    @torch.inference_mode()
    def forward(self, items: list[ForwardItem]) -> torch.Tensor:
        """Compute the items' new tokens into the KV cache in one pass. Returns fp32 logits for
        each item's last `num_logits` tokens, items in the order given: [sum num_logits, vocab]."""
        order = sorted(range(len(items)), key=lambda i: len(items[i].token_ids) != 1)  # decodes first
        input_ids, positions, meta, logits_indices = self._prepare([items[i] for i in order])
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        logits = self.model.compute_logits(hidden[logits_indices]).float()
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
        for row, it in enumerate(items):
            block_tables[row, :len(it.block_table)] = it.block_table
        seq_of_token = np.repeat(np.arange(len(items)), query_lens)
        positions = np.arange(query_start_loc[-1]) - query_start_loc[seq_of_token] + starts[seq_of_token]
        slot_mapping = block_tables[seq_of_token, positions // bs] * bs + positions % bs
        input_ids = np.fromiter((t for it in items for t in it.token_ids), dtype=np.int64,
                                count=int(query_start_loc[-1]))
        num_logits = np.array([it.num_logits for it in items], dtype=np.int64)
        logits_indices = np.repeat(query_start_loc[1:] - num_logits, num_logits) + (
            np.arange(num_logits.sum()) - np.repeat(np.cumsum(num_logits) - num_logits, num_logits))
        num_decodes = int((query_lens == 1).sum())  # all at the front
        non_decode_lens = query_lens[num_decodes:]
        to_dev = self._to_device
        meta = AttentionMetadata(
            slot_mapping=to_dev(slot_mapping), query_start_loc=to_dev(query_start_loc), seq_lens=to_dev(seq_lens),
            block_tables=to_dev(block_tables), num_decodes=num_decodes,
            max_query_len=int(non_decode_lens.max()) if len(non_decode_lens) else 1, max_seq_len=int(seq_lens.max()))
        return to_dev(input_ids), to_dev(positions), meta, to_dev(logits_indices)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)
