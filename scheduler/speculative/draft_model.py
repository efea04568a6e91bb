"""A small model that drafts k tokens for every speculating sequence, batched: k forward passes
per step for the whole batch, never a loop over sequences.

Its KV cache has the same number of blocks as the target's and is addressed through the same
block tables, so the memory plan and the bookkeeping are shared. `num_draft_computed_tokens`
says how much of a sequence's history the draft holds; it catches up on whatever is missing
(the prompt, the last accepted tokens) in its first pass of each step, and is rolled back after
verification by lowering that count, not by moving data.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from scheduler.kv_cache import BlockPool
from scheduler.runner import ForwardItem, ModelRunner
from scheduler.sampling import Sampler, SamplingBatch
from scheduler.scheduler import ScheduledRequest


class DraftModelProposer:
    def __init__(self, runner: ModelRunner, sampler: Sampler):
        self.runner = runner
        self.sampler = sampler
        self.vocab_size = runner.model.config.vocab_size

    def propose(self, spec: list[ScheduledRequest], pool: BlockPool,
                sampling_for: Callable[[list[int]], SamplingBatch]) -> torch.Tensor:
        """Fill each s.draft_token_ids with s.num_spec_slots tokens; return q as [R, K, V]."""
        ks = [s.num_spec_slots for s in spec]
        tables = [pool.block_table(s.request.request_id) for s in spec]
        q = torch.zeros(len(spec), max(ks), self.vocab_size, device=self.runner.device)
        items = []
        for s, table in zip(spec, tables):
            request = s.request
            start = min(request.num_draft_computed_tokens, request.num_tokens - 1)
            items.append(ForwardItem(request.all_token_ids[start:], start, table, 1))
        active = list(range(len(spec)))
        for j in range(max(ks)):
            logits = self.runner.forward(items)
            batch = sampling_for(active)
            probs = self.sampler.compute_probs(logits, batch)
            q[active, j] = probs
            tokens = self.sampler.sample_probs(probs, batch)
            for row, token in zip(active, tokens.tolist()):
                spec[row].draft_token_ids.append(token)
            active = [row for row in active if ks[row] > j + 1]
            items = [ForwardItem([spec[row].draft_token_ids[-1]], spec[row].request.num_tokens + j, tables[row], 1)
                     for row in active]
        for s in spec:
            # It has seen the known tokens and every draft but the last.
            s.request.num_draft_computed_tokens = s.request.num_tokens + len(s.draft_token_ids) - 1
        return q
