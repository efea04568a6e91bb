"""The EAGLE head's runner: its one layer of paged KV cache, addressed through the target's block
tables (the same number of blocks), and its passes over packed rows. It borrows the model runner's
packing (ModelRunner._prepare); the head's rows carry a feature each beside their token."""

from __future__ import annotations

import torch

from scheduler.speculative.eagle.head import EagleHead
from scheduler.worker.models.base import head_dim
from scheduler.worker.models.llama import load_fused_ops
from scheduler.worker.packing import ForwardItem
from scheduler.worker.runner import ModelRunner, fused_kernels_available, kv_zeros


class HeadRunner(ModelRunner):
    def __init__(self, head: EagleHead, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        # Not the target runner's __init__: one layer of KV and no graphs of the target's shapes.
        config = head.llama_config
        shape = (num_blocks, block_size, config.num_key_value_heads, head_dim(config))
        self.model, self.block_size, self.device = head, block_size, device
        self.kv_caches = [(kv_zeros(shape, dtype, device), kv_zeros(shape, dtype, device))]
        self.fused = fused_kernels_available(device)
        self.ops = None
        if self.fused:
            head.midlayer.self_attn.fuse_projections()
            head.midlayer.mlp.fuse_projections()
            self.ops = load_fused_ops()
        self.graphs = None
        self._packed_order = None

    @torch.inference_mode()
    def run(self, items: list[ForwardItem], features: torch.Tensor, token_ids: torch.Tensor | None = None):
        """One pass of the head over the items' rows (decodes first), features [rows, H] in the same order;
        token_ids (on the device) replace every item's one token. Returns the output hidden states of
        each item's last row [len(items), H]."""
        input_ids, positions, meta, logit_rows = self._prepare(items)
        if token_ids is not None:
            input_ids = token_ids.to(input_ids.dtype)
        hidden = self.model.forward_paged(input_ids, features, positions, self.kv_caches[0], meta, self.ops)
        return hidden[logit_rows]

    @torch.inference_mode()
    def fill(self, items: list[ForwardItem], features: torch.Tensor) -> None:
        """Only the keys and values of the items' rows (decodes first): rows a later pass attends to."""
        input_ids, positions, meta, _ = self._prepare(items)
        self.model.write_kv(input_ids, features, positions, self.kv_caches[0], meta.slot_mapping)
