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
    StepInputs,
    as_inputs,
    device_token_patch,
    logits_indices,
    positions_and_slots,
)
from scheduler.worker.parallel import max_kv_heads
from scheduler.worker.shifts import apply_shifts, shift_plan

__all__ = ["ForwardItem", "ModelRunner", "StepInputs", "fused_kernels_available", "kv_bytes_per_block"]

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


def decodes_first(inputs: StepInputs) -> np.ndarray | None:
    """The order that puts the sequences of one new token first (as the reference attention wants them), None
    where they come first already."""
    decodes = inputs.query_lens == 1
    if not (np.diff(decodes.astype(np.int8)) > 0).any():  # no decode after another kind of row
        return None
    return np.argsort(~decodes, kind="stable")


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
        self._slots: torch.Tensor | None = None  # the last pass's KV slot of each new token, in its packed order

    def capture_graphs(self, max_num_seqs: int, max_query_len: int, max_model_len: int,
                       max_batched_tokens: int = 0) -> None:
        """CUDA graphs for steps of up to max_num_seqs sequences of up to max_query_len new tokens each
        (1 for decodes; 1 + k when verifying k drafts), in batch-size buckets, and for steps with prompt
        chunks of up to max_batched_tokens tokens in all (0: none)."""
        assert self.fused, "CUDA graphs need the fused kernels"
        self.graphs = CudaGraphs(self.model, self.kv_caches, self.block_size, max_num_seqs, max_query_len,
                                 max_model_len, max_batched_tokens)

    @torch.inference_mode()
    def forward(self, items: list[ForwardItem] | StepInputs, token_ids: torch.Tensor | None = None,
                device_tokens: torch.Tensor | None = None, with_hidden: bool = False,
                device_shifts: torch.Tensor | None = None):
        """Compute the sequences' new tokens into the KV cache in one pass (items: ForwardItems, or the same as
        arrays). Returns fp32 logits for each sequence's last `num_logits` tokens, in the order given:
        [sum num_logits, vocab]; with_hidden, also the model's last hidden states at those rows: (logits, hidden).

        Tokens the device holds and the host has not learnt yet, so the host never waits for them:
        token_ids, for sequences of one token each (a draft pass feeding on the last one's output),
        replaces every sequence's token; device_tokens [rows, width] fills the trailing placeholders of
        sequences that name a device_row (drafts to verify, or the tokens of the step in flight). device_shifts
        [rows]: where the host does not know yet how far such a sequence starts (the step before's accepted
        drafts), the device moves it on by device_shifts[device_row] (shifts.py)."""
        inputs = as_inputs(items)
        assert token_ids is None or bool((inputs.query_lens == 1).all())
        self._packed_order = None  # the eager pass sets the order it packed the sequences in
        patch = None if device_tokens is None or self.graphs is None else self._patch(inputs, device_tokens)
        shifts = None if device_shifts is None or self.graphs is None else shift_plan(inputs, device_shifts)
        if self.graphs is not None and self.graphs.fits(inputs):
            hidden = self.graphs.replay(inputs, token_ids, patch, shifts)
            self._slots = self.graphs.slots
        elif self.graphs is not None and token_ids is None and (bucket := self.graphs.mixed_bucket(inputs)):
            hidden = self.graphs.replay_mixed(inputs, bucket, patch, shifts)
            hidden = hidden[self._to_device(logits_indices(inputs.query_lens, inputs.num_logits))]
            self._slots = self.graphs.slots
        else:
            hidden = self._forward_eager(inputs, token_ids, device_tokens, device_shifts)
        logits = self.model.compute_logits(hidden).float()
        return (logits, hidden) if with_hidden else logits

    def aux_hidden_states(self, items: list[ForwardItem] | StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """After forward(items): the model's kept streams (CausalLM.keep_aux_hidden_states) at every new
        token of the sequences [sum of query lengths, width], and the KV slot the pass wrote each token to
        [sum of query lengths] (where the device moved a sequence on, its slots moved with it), both in the
        sequences' order. The streams are a view of the model's buffer, which the next pass overwrites."""
        lens = as_inputs(items).query_lens
        num_tokens = int(lens.sum())
        out, slots = self.model.aux.out[:num_tokens], self._slots[:num_tokens]
        order = self._packed_order
        if order is None:
            return out, slots
        packed_lens = lens[order]
        packed_starts = np.cumsum(packed_lens) - packed_lens
        where = np.empty_like(packed_starts)
        where[order] = packed_starts  # each sequence's first token in the packed pass
        back = np.repeat(where, lens) + (np.arange(num_tokens) - np.repeat(np.cumsum(lens) - lens, lens))
        back = self._to_device(back.astype(np.int64))
        return out[back], slots[back]

    def _patch(self, inputs: StepInputs, device_tokens: torch.Tensor):
        """(destinations in the packed input, tokens) for the sequences' device-held tokens, or None."""
        where = device_token_patch(inputs, device_tokens.shape[1])
        if where is None:
            return None
        where = to_device(where, torch.long, self.device)
        return where[0], device_tokens.reshape(-1)[where[1]]

    @torch.inference_mode()
    def _forward_eager(self, inputs: list[ForwardItem] | StepInputs, token_ids: torch.Tensor | None = None,
                       device_tokens: torch.Tensor | None = None,
                       device_shifts: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states of the rows forward() returns logits for."""
        inputs = as_inputs(inputs)
        order = decodes_first(inputs)
        if order is not None:
            inputs = inputs.take(order)
        input_ids, positions, meta, logit_rows = self._prepare(inputs)
        if device_shifts is not None and (shifts := shift_plan(inputs, device_shifts)):
            apply_shifts(shifts, positions, meta.slot_mapping, meta.seq_lens, meta.block_tables, self.block_size)
            meta.max_seq_len = meta.block_tables.shape[1] * self.block_size  # a bound the host knows
        if token_ids is not None:  # every sequence is a decode, so the order is the caller's
            input_ids = token_ids.to(input_ids.dtype)
        if device_tokens is not None and (patch := self._patch(inputs, device_tokens)):
            input_ids.index_copy_(0, patch[0], patch[1].to(input_ids.dtype))
        hidden = self.model(input_ids, positions, self.kv_caches, meta)[logit_rows]
        self._packed_order, self._slots = order, meta.slot_mapping
        if order is None:
            return hidden
        # Rows come out in the sorted order; hand them back in the caller's.
        num_logits = inputs.num_logits  # in the sorted order
        sorted_starts = np.cumsum(num_logits) - num_logits
        where = np.empty_like(sorted_starts)
        where[order] = sorted_starts  # each caller's row's first logit row, in the sorted output
        counts = num_logits[np.argsort(order)]
        back = np.repeat(where, counts) + (np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts,
                                                                                    counts))
        return hidden[self._to_device(back.astype(np.int64))]

    def _prepare(self, inputs: list[ForwardItem] | StepInputs):
        inputs = as_inputs(inputs)
        bs = self.block_size
        query_lens, starts = inputs.query_lens, inputs.starts
        seq_lens = starts + query_lens
        query_start_loc = np.concatenate(([0], np.cumsum(query_lens)))
        # As wide as the longest table, as int64 (the attention's metadata).
        block_tables = inputs.block_tables[:, :int(inputs.num_blocks.max())].astype(np.int64)
        positions, slot_mapping = positions_and_slots(query_lens, query_start_loc, starts, block_tables, bs)
        logit_rows = logits_indices(query_lens, inputs.num_logits)
        num_decodes = int((query_lens == 1).sum())  # all at the front
        non_decode_lens = query_lens[num_decodes:]
        to_dev = self._to_device
        meta = AttentionMetadata(
            slot_mapping=to_dev(slot_mapping), query_start_loc=to_dev(query_start_loc), seq_lens=to_dev(seq_lens),
            block_tables=to_dev(block_tables), num_decodes=num_decodes,
            max_query_len=int(non_decode_lens.max()) if len(non_decode_lens) else 1, max_seq_len=int(seq_lens.max()))
        return to_dev(inputs.token_ids), to_dev(positions), meta, to_dev(logit_rows)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)
