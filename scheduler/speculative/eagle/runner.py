"""The EAGLE head's runner: its one layer of paged KV cache and, beside it, a paged feature cache (the
fused target hidden states of every token the target computed), both addressed through the target's
block tables (the same number of blocks); and its passes over packed rows. It borrows the model
runner's packing (ModelRunner._prepare)."""

from __future__ import annotations

import math

import numpy as np
import torch

from scheduler.speculative.eagle.head import EagleHead
from scheduler.worker.models.base import head_dim
from scheduler.worker.models.llama import load_fused_ops
from scheduler.worker.packing import ForwardItem, fill_block_tables, positions_and_slots
from scheduler.worker.runner import ModelRunner, fused_kernels_available, kv_zeros


def planned_config(head: EagleHead):
    """A one-layer config whose KV bytes per block are the head's KV and feature cache together: what
    the memory plan gives each block room for (it counts KV heads)."""
    config = head.llama_config
    planned = type(config)(**config.to_dict())
    planned.head_dim = head_dim(config)
    planned.num_key_value_heads = config.num_key_value_heads + math.ceil(config.hidden_size / (2 * planned.head_dim))
    return planned


class HeadRunner(ModelRunner):
    def __init__(self, head: EagleHead, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        # Not the target runner's __init__: one layer of KV and no graphs of the target's shapes.
        config = head.llama_config
        shape = (num_blocks, block_size, config.num_key_value_heads, head_dim(config))
        self.model, self.block_size, self.device = head, block_size, device
        self.kv_caches = [(kv_zeros(shape, dtype, device), kv_zeros(shape, dtype, device))]
        self.features = kv_zeros((num_blocks * block_size, config.hidden_size), dtype, device)
        self.fused = fused_kernels_available(device)
        self.ops = None
        if self.fused:
            head.midlayer.self_attn.fuse_projections()
            head.midlayer.mlp.fuse_projections()
            self.ops = load_fused_ops()
        self.graphs = None
        self._packed_order = None

    @torch.inference_mode()
    def store(self, items: list[ForwardItem], aux: torch.Tensor) -> None:
        """The features of every new token of the target's items (aux: their kept streams, in order), at
        their slots."""
        count = len(items)
        query_lens = np.fromiter((len(it.token_ids) for it in items), np.int64, count)
        starts = np.fromiter((it.start for it in items), np.int64, count)
        tables = np.zeros((count, max(len(it.block_table) for it in items)), dtype=np.int64)
        fill_block_tables(tables, items)
        _, slots = positions_and_slots(query_lens, np.concatenate(([0], np.cumsum(query_lens))), starts, tables,
                                       self.block_size)
        self.features.index_copy_(0, self._to_device(slots), self.model.fuse(aux))

    def prepare(self, items: list[ForwardItem]) -> tuple:
        """A pass's inputs on the device (items decodes first), ahead of running it."""
        return self._prepare(items)

    @torch.inference_mode()
    def run(self, prepared: tuple, features: torch.Tensor | None = None,
            token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One pass of the head over prepared items' rows. Row t reads the feature stored at its slot, or
        features [rows, H] given in the same order; token_ids (on the device) replace every item's one
        token. Returns the output hidden states of each item's last row [len(items), H]."""
        input_ids, positions, meta, logit_rows = prepared
        if token_ids is not None:
            input_ids = token_ids.to(input_ids.dtype)
        if features is None:
            features = self.features[meta.slot_mapping]
        hidden = self.model.forward_paged(input_ids, features, positions, self.kv_caches[0], meta, self.ops)
        return hidden[logit_rows]

    @torch.inference_mode()
    def fill(self, items: list[ForwardItem]) -> None:
        """Only the keys and values of the items' rows (decodes first), from their stored features: rows a
        later pass attends to."""
        input_ids, positions, meta, _ = self._prepare(items)
        features = self.features[meta.slot_mapping]
        self.model.write_kv(input_ids, features, positions, self.kv_caches[0], meta.slot_mapping)
