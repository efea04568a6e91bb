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

import numpy as np
import torch

from scheduler.core.kv_cache import BlockPool
from scheduler.core.request import Request
from scheduler.core.scheduler import ScheduledRequest
from scheduler.sampling.sampler import Sampler, SamplingBatch, to_device
from scheduler.worker.runner import ForwardItem, ModelRunner


class DraftModelProposer:
    def __init__(self, runner: ModelRunner, sampler: Sampler, max_catch_up: int = 1):
        """max_catch_up: most tokens behind the target a sequence is after a step (1 + k_max)."""
        self.runner = runner
        self.max_catch_up = max_catch_up
        self.sampler = sampler
        self.vocab_size = runner.model.config.vocab_size

    def propose(self, spec: list[ScheduledRequest], pool: BlockPool,
                sampling_for: Callable[[list[int]], SamplingBatch | None]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Draft s.num_spec_slots tokens for each s. Returns (q, drafts): q as [R, K, V], or None when
        sampling_for says every row drafts greedily (verifying greedy requests reads no q); drafts
        [R, K] on the device, row r for spec[r]. s.draft_token_ids gets placeholders of the right
        length: the host learns the drafts after the target's pass, which reads them on the device.
        sampling_for(rows) gives the sampling rows of those speculating requests, None when all greedy."""
        ks = [s.num_spec_slots for s in spec]
        depth = max(ks)
        tables = [pool.block_table(s.request.request_id) for s in spec]
        items = [self._catch_up(s.request, table) for s, table in zip(spec, tables)]
        active = list(range(len(spec)))
        batch, batch_rows = sampling_for(active), active
        device, model = self.runner.device, self.runner.model
        if batch is None and min(ks) == depth:
            # Greedy at one depth for all, every catch-up short: the whole proposal is one graph replay.
            proposal = self.runner.greedy_proposal(items, depth - 1)
            if proposal is not None:
                return None, self._drafted(spec, ks, proposal)
        q = None if batch is None else torch.zeros(len(spec), depth, self.vocab_size, device=device)
        # Drafted tokens stay on the device: each pass reads the last one's straight from there,
        # and so does the target's verification pass.
        drafted = torch.zeros(len(spec), depth, dtype=torch.long, device=device)
        tokens = None
        for j in range(depth):
            if j == 1 and batch is None and len(active) == len(spec):
                # Greedy drafting at one depth for all: the remaining passes are one graph replay.
                chain = self.runner.greedy_chain(items, tokens, depth - 1)
                if chain is not None:
                    drafted[:, 1:] = chain.T
                    break
            logits = self.runner.forward(items, tokens)
            if j == 0 and logits.shape[0] != len(items):
                last_rows = np.cumsum([it.num_logits for it in items]) - 1
                logits = logits[to_device(last_rows, torch.long, device)]  # pinned: no wait for the pass
            if batch_rows != active:  # only when depths differ: the batch is built once per step otherwise
                batch, batch_rows = sampling_for(active), active
            rows = slice(None) if len(active) == len(spec) else torch.tensor(active, device=device)
            if batch is None:
                tokens = model.token_ids(logits.argmax(dim=-1))
            else:  # a draft restricted to frequent tokens gives the others probability 0
                probs = self.sampler.compute_probs(model.full_vocab_logits(logits), batch)
                q[rows, j] = probs
                tokens = self.sampler.sample_probs(probs, batch)
            drafted[rows, j] = tokens
            still = [i for i, row in enumerate(active) if ks[row] > j + 1]
            if len(still) != len(active):
                tokens = tokens[torch.tensor(still, device=device)] if still else None
                active = [active[i] for i in still]
            items = self._next_items(spec, active, tables, j + 1)
        return q, self._drafted(spec, ks, drafted)

    @staticmethod
    def _drafted(spec: list[ScheduledRequest], ks: list[int], drafted: torch.Tensor) -> torch.Tensor:
        for s, k in zip(spec, ks):
            s.draft_token_ids = [0] * k
            # It has seen the known tokens and every draft but the last.
            s.request.num_draft_computed_tokens = s.request.num_tokens + k - 1
        return drafted

    @staticmethod
    def _next_items(spec: list[ScheduledRequest], rows: list[int], tables: list[list[int]], j: int):
        """Pass j (j >= 1) computes the draft j made before it: one token at num_tokens + j - 1."""
        return [ForwardItem([0], spec[row].request.num_tokens + j - 1, tables[row], 1) for row in rows]

    def _catch_up(self, request: Request, table: list[int]) -> ForwardItem:
        start = min(request.num_draft_computed_tokens, request.num_tokens - 1)
        tokens = request.all_token_ids[start:]
        # A short catch-up (the tokens accepted last step) asks for logits at every position, so the
        # pass has the shape of a verification step and can replay a CUDA graph; only the last is used.
        return ForwardItem(tokens, start, table, len(tokens) if len(tokens) <= self.max_catch_up else 1)
