"""The draft model's runner: the target's runner plus the draft's own CUDA graphs (DraftGraphs), so
a greedy proposal, or the passes after its first, run as one replay."""

from __future__ import annotations

import torch

from scheduler.speculative.draft.graphs import DraftGraphs
from scheduler.worker.packing import ForwardItem
from scheduler.worker.runner import ModelRunner


class DraftRunner(ModelRunner):
    def capture_graphs(self, max_num_seqs: int, max_query_len: int, max_model_len: int,
                       max_batched_tokens: int = 0, max_chain: int = 0, proposals: bool = False) -> None:
        """The runner's graphs, plus greedy chains of 1..max_chain decode passes (see greedy_chain) and,
        with proposals, whole greedy proposals of 1..max_chain + 1 tokens (see greedy_proposal)."""
        assert self.fused, "CUDA graphs need the fused kernels"
        self.graphs = DraftGraphs(self.model, self.kv_caches, self.block_size, max_num_seqs, max_query_len,
                                  max_model_len, max_batched_tokens, max_chain, proposals)

    @torch.inference_mode()
    def greedy_proposal(self, items: list[ForwardItem], passes: int) -> torch.Tensor | None:
        """A draft model's greedy proposal as one CUDA graph replay: a catch-up pass over the items (up
        to max_query_len tokens each), then `passes` greedy decode passes, each feeding its argmax to
        the next. Returns the argmax tokens [len(items), 1 + passes] on the device: column 0 follows
        each item's last token. None where no graph holds these items."""
        return self.graphs.replay_proposal(items, passes) if self.proposal_fits(items, passes) else None

    def proposal_fits(self, items: list[ForwardItem], passes: int) -> bool:
        """Whether a graph of whole greedy proposals holds these items and passes."""
        graphs = self.graphs
        if graphs is None or not 0 <= passes <= graphs.proposal_passes or len(items) > graphs.sizes[-1]:
            return False
        bs = self.block_size
        return all(len(it.token_ids) <= graphs.max_query_len and -(-(it.start + len(it.token_ids) + passes) // bs)
                   <= len(it.block_table) <= graphs.width for it in items)

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
