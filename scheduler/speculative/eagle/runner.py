"""The EAGLE head's runner: its one layer of paged KV cache and, beside it, a paged feature cache (the
fused target hidden states of every token the target computed), both addressed through the target's
block tables (the same number of blocks); and its passes over packed rows. It borrows the model
runner's packing (ModelRunner._prepare)."""

from __future__ import annotations

import math

import numpy as np
import torch

from scheduler.speculative.draft.runner import DraftRunner
from scheduler.speculative.eagle.chain import EagleGraphs, greedy_chain
from scheduler.speculative.eagle.head import EagleHead
from scheduler.worker.models.base import head_dim
from scheduler.worker.models.llama import load_fused_ops
from scheduler.worker.packing import ForwardItem, as_inputs
from scheduler.worker.runner import decodes_first, fused_kernels_available, kv_zeros


def planned_config(head: EagleHead):
    """A one-layer config whose KV bytes per block are the head's KV and feature cache together: what
    the memory plan gives each block room for (it counts KV heads)."""
    config = head.llama_config
    planned = type(config)(**config.to_dict())
    planned.head_dim = head_dim(config)
    planned.num_key_value_heads = config.num_key_value_heads + math.ceil(config.hidden_size / (2 * planned.head_dim))
    return planned


class HeadRunner(DraftRunner):
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

    def capture_graphs(self, max_num_seqs: int, max_query_len: int, max_model_len: int, max_chain: int) -> None:
        """Whole greedy proposals (catch-up of up to max_query_len rows, then up to max_chain passes) as
        CUDA graphs per batch-size bucket: greedy_proposal() replays them."""
        assert self.fused, "CUDA graphs need the fused kernels"
        self.graphs = EagleGraphs(self.model, self.kv_caches, self.features, self.ops, self.block_size, max_num_seqs,
                                  max_query_len, max_model_len, max_chain)

    @torch.inference_mode()
    def chain(self, items: list[ForwardItem], passes: int) -> torch.Tensor:
        """A greedy proposal run eagerly, the graphs' computation: drafts [len(items), 1 + passes] on the
        device, column 0 after each item's last row (see chain.greedy_chain)."""
        inputs = as_inputs(items)
        order = decodes_first(inputs)
        if order is not None:
            inputs = inputs.take(order)
        input_ids, positions, meta, last_rows = self._prepare(inputs)
        drafts = greedy_chain(self.model, self.kv_caches[0], self.features, self.ops, input_ids, positions, meta,
                              last_rows, passes, self.block_size)
        return drafts if order is None else drafts[self._to_device(np.argsort(order))]

    @torch.inference_mode()
    def chain_after(self, items: list[ForwardItem], device_tokens: torch.Tensor, back: torch.Tensor,
                    passes: int) -> torch.Tensor:
        """chain() where the step in flight's tokens end the items: each item's last num_device_tokens tokens are
        device_tokens' (as ModelRunner.forward takes them), of which the last back[i] (on the device: the drafts
        that step did not accept) are not real. The draft follows the last real row and the chain goes on from
        there, writing over the rows past it; the host never waits: it does not know back. (The rows past it lie
        within the slots the target reserved for the step in flight, and none is read before it is written again.)
        A graph of whole proposals replays it where one holds the items (CUDA)."""
        if self.proposal_fits(items, passes):
            return self.graphs.replay_after(items, back, passes, self._patch(as_inputs(items), device_tokens))
        return self.chain_after_eagerly(items, device_tokens, back, passes)

    @torch.inference_mode()
    def chain_after_eagerly(self, items: list[ForwardItem], device_tokens: torch.Tensor, back: torch.Tensor,
                            passes: int) -> torch.Tensor:
        """chain_after() without graphs: what their replay computes."""
        inputs = as_inputs(items)
        order = decodes_first(inputs)
        if order is not None:
            inputs, back = inputs.take(order), back[self._to_device(order)]
        input_ids, positions, meta, last_rows = self._prepare(inputs)
        patch = self._patch(inputs, device_tokens)
        if patch is not None:
            input_ids.index_copy_(0, patch[0], patch[1].to(input_ids.dtype))
        drafts = greedy_chain(self.model, self.kv_caches[0], self.features, self.ops, input_ids, positions, meta,
                              last_rows - back, passes, self.block_size, back)
        return drafts if order is None else drafts[self._to_device(np.argsort(order))]

    @torch.inference_mode()
    def store(self, slots: torch.Tensor, aux: torch.Tensor) -> None:
        """The features of the target's new tokens (aux: their kept streams) at the KV slots its pass wrote them to."""
        self.features.index_copy_(0, slots.long(), self.model.fuse(aux))

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
        return self.model.forward_paged(input_ids, features, positions, self.kv_caches[0], meta, self.ops, logit_rows)

    @torch.inference_mode()
    def fill(self, items: list[ForwardItem]) -> None:
        """Only the keys and values of the items' rows (decodes first), from their stored features: rows a
        later pass attends to."""
        input_ids, positions, meta, _ = self._prepare(items)
        features = self.features[meta.slot_mapping]
        self.model.write_kv(input_ids, features, positions, self.kv_caches[0], meta.slot_mapping, self.ops)
