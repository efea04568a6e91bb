"""Turns a scheduled step into tensors, runs the model over the paged KV cache, returns logits."""

from __future__ import annotations

import numpy as np
import torch

from scheduler.attention import AttentionMetadata
from scheduler.kv_cache import BlockPool
from scheduler.models.llama import CausalLM
from scheduler.scheduler import ScheduledRequest


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

    @staticmethod
    def order(scheduled: list[ScheduledRequest]) -> list[ScheduledRequest]:
        """Decodes (one new token) first: the attention backends treat them as one group."""
        return sorted(scheduled, key=lambda s: s.num_new_tokens != 1)

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledRequest], pool: BlockPool) -> torch.Tensor:
        """Run one step over `batch` (already in `order`). Returns logits [num sampling rows, vocab],
        rows in batch order of the requests whose step ends at their last known token."""
        input_ids, positions, meta, logits_indices = self._prepare(batch, pool)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        return self.model.compute_logits(hidden[logits_indices]).float()

    def _prepare(self, batch: list[ScheduledRequest], pool: BlockPool):
        bs = self.block_size
        query_lens = np.array([s.num_new_tokens for s in batch], dtype=np.int64)
        starts = np.array([s.request.num_computed_tokens for s in batch], dtype=np.int64)
        seq_lens = starts + query_lens
        query_start_loc = np.concatenate(([0], np.cumsum(query_lens)))
        tables = [pool.block_table(s.request.request_id) for s in batch]
        block_tables = np.zeros((len(batch), max(len(t) for t in tables)), dtype=np.int64)
        for row, table in enumerate(tables):
            block_tables[row, :len(table)] = table
        seq_of_token = np.repeat(np.arange(len(batch)), query_lens)
        positions = np.arange(query_start_loc[-1]) - query_start_loc[seq_of_token] + starts[seq_of_token]
        slot_mapping = block_tables[seq_of_token, positions // bs] * bs + positions % bs
        input_ids = np.fromiter((t for s in batch for t in s.request.all_token_ids[
            s.request.num_computed_tokens:s.request.num_computed_tokens + s.num_new_tokens]), dtype=np.int64,
            count=int(query_start_loc[-1]))
        samples = np.array([s.samples for s in batch])
        logits_indices = query_start_loc[1:][samples] - 1
        num_decodes = int((query_lens == 1).sum())  # all at the front, see order()
        non_decode_lens = query_lens[num_decodes:]
        to_dev = self._to_device
        meta = AttentionMetadata(
            slot_mapping=to_dev(slot_mapping), query_start_loc=to_dev(query_start_loc), seq_lens=to_dev(seq_lens),
            block_tables=to_dev(block_tables), num_decodes=num_decodes,
            max_query_len=int(non_decode_lens.max()) if len(non_decode_lens) else 1, max_seq_len=int(seq_lens.max()))
        return to_dev(input_ids), to_dev(positions), meta, to_dev(logits_indices)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)
