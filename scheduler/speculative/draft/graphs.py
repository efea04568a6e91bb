"""A draft model's own CUDA graphs, beside the runner's: its greedy passes after the first run as
one chained graph, and when its first pass is a short catch-up (the tokens accepted last step),
the whole proposal, catch-up and chain, is one graph."""

from __future__ import annotations

import torch

from scheduler.worker.attention import AttentionMetadata
from scheduler.worker.graphs import CudaGraphs
from scheduler.worker.packing import ForwardItem


class DraftGraphs(CudaGraphs):
    """The runner's graphs plus, per batch-size bucket, greedy chains of 1..max_chain passes and
    (with proposals) whole greedy proposals of 0..max_chain passes after the catch-up."""

    def __init__(self, model, kv_caches: list, block_size: int, max_num_seqs: int, max_query_len: int,
                 max_model_len: int, max_batched_tokens: int = 0, max_chain: int = 0, proposals: bool = False):
        self.max_chain = max_chain
        self.proposal_passes = max_chain if proposals else -1
        self.chains: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (seqs, passes)
        self.proposals: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (seqs, passes)
        self.num_proposal_replays = 0  # of the replays, whole greedy proposals
        super().__init__(model, kv_caches, block_size, max_num_seqs, max_query_len, max_model_len, max_batched_tokens)

    def _extra_capture_keys(self) -> list:
        keys = [(self.chains, self._static_chain, b, n) for n in range(self.max_chain, 0, -1)
                for b in reversed(self.sizes)]
        keys += [(self.proposals, self._static_proposal, b, n) for n in range(self.proposal_passes, -1, -1)
                 for b in reversed(self.sizes)]
        return keys

    def _extra_description(self) -> str:
        return f", greedy chains of 1-{self.max_chain} passes" if self.max_chain else ""

    def _static_chain(self, num_seqs: int, passes: int) -> torch.Tensor:
        """`passes` decode passes over the buffers' first pass; later passes derive their positions,
        KV slots and lengths on the device. Rows past the real ones have slot -1 and stay inert."""
        buf, bs, model = self.device_buf, self.block_size, self.model
        ids = self._view(buf, "input_ids", num_seqs)
        first_positions = self._view(buf, "positions", num_seqs)
        first_slots = self._view(buf, "slots", num_seqs)
        first_lens = self._view(buf, "seq_lens", num_seqs)
        tables = self._view(buf, "block_tables", num_seqs * self.width).view(num_seqs, self.width)
        real = first_slots >= 0
        out = []
        for j in range(passes):
            positions, slots, seq_lens = first_positions + j, first_slots, first_lens + j * real
            if j:
                blocks = tables.gather(1, (positions // bs).long().unsqueeze(1)).squeeze(1)
                slots = torch.where(real, blocks * bs + positions % bs, -1)
            meta = AttentionMetadata(
                slot_mapping=slots, query_start_loc=self._view(buf, "query_start_loc", num_seqs + 1),
                seq_lens=seq_lens, block_tables=tables, num_decodes=num_seqs, max_query_len=1, max_seq_len=0)
            ids = model.greedy_token_ids(model(ids, positions, self.kv_caches, meta))
            out.append(ids)
        return torch.stack(out)

    def _static_proposal(self, num_seqs: int, passes: int) -> torch.Tensor:
        """A greedy proposal: a catch-up pass over the buffers (up to max_query_len tokens a sequence),
        the argmax after each sequence's last token, then `passes` decode passes chained as in
        _static_chain from there. Returns the argmax tokens [num_seqs, 1 + passes]."""
        buf, bs, model = self.device_buf, self.block_size, self.model
        hidden = self._static_forward(num_seqs, self.max_query_len)
        last = (self._view(buf, "query_start_loc", num_seqs + 1)[1:] - 1).clamp(min=0).long()
        ids = model.greedy_token_ids(hidden[last])
        caught_up = self._view(buf, "seq_lens", num_seqs)
        tables = self._view(buf, "block_tables", num_seqs * self.width).view(num_seqs, self.width)
        real = caught_up > 0
        # One token for each real sequence, none for the rest.
        query_start_loc = torch.cat([real.new_zeros(1, dtype=torch.int32), real.int().cumsum(0, dtype=torch.int32)])
        out = [ids]
        for j in range(passes):
            positions = caught_up + j
            blocks = tables.gather(1, (positions // bs).long().unsqueeze(1)).squeeze(1)
            meta = AttentionMetadata(
                slot_mapping=torch.where(real, blocks * bs + positions % bs, -1), query_start_loc=query_start_loc,
                seq_lens=(positions + 1) * real, block_tables=tables, num_decodes=num_seqs, max_query_len=1,
                max_seq_len=0)
            ids = model.greedy_token_ids(model(ids, positions, self.kv_caches, meta))
            out.append(ids)
        return torch.stack(out, dim=1)

    def replay_chain(self, items: list[ForwardItem], token_ids: torch.Tensor, passes: int) -> torch.Tensor:
        """Argmax tokens [passes, len(items)] of a greedy chain (see ModelRunner.greedy_chain)."""
        num_seqs = self._batch_bucket(items)
        out, _ = self._replay(self.chains, (num_seqs, passes), items, num_seqs, token_ids, None)
        return out[:, :len(items)]

    def replay_proposal(self, items: list[ForwardItem], passes: int) -> torch.Tensor:
        """Argmax tokens [len(items), 1 + passes] of a greedy proposal (see ModelRunner.greedy_proposal)."""
        num_seqs = self._batch_bucket(items)
        self.num_proposal_replays += 1
        out, _ = self._replay(self.proposals, (num_seqs, passes), items, num_seqs * self.max_query_len, None, None)
        return out[:len(items)]
