"""A small model that drafts k tokens for every speculating sequence, batched: k forward passes
per step for the whole batch, never a loop over sequences.

Its KV cache has the same number of blocks as the target's and is addressed through the same
block tables, so the memory plan and the bookkeeping are shared. The proposer keeps how much of
each sequence's history its KV holds; it catches up on whatever is missing (the prompt, the last
accepted tokens) in its first pass of each step. Rejected drafts are rolled back by counting no
further than the target's computed tokens, and a preemption (which frees the blocks) by starting
over: bookkeeping, never data motion.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

import numpy as np
import torch

from scheduler.config import EngineConfig
from scheduler.core.kv_cache import BlockPool
from scheduler.core.request import Request
from scheduler.core.scheduler import ScheduledRequest
from scheduler.sampling.rows import draft_rows
from scheduler.sampling.sampler import Sampler
from scheduler.speculative.draft.loading import load_draft
from scheduler.speculative.draft.runner import DraftRunner
from scheduler.speculative.proposer import Proposal, ProposerContext
from scheduler.tensors import to_device
from scheduler.worker.models import LoadedModel
from scheduler.worker.packing import ForwardItem


class DraftModelProposer:
    needs_hidden_states = False
    aux_layers = None

    def __init__(self, draft: LoadedModel, config: EngineConfig, sampler: Sampler, dtype: torch.dtype,
                 device: torch.device):
        self.draft = draft
        self.kv_model_config = draft.config
        self.max_positions = draft.max_positions
        self.config, self.dtype, self.device = config, dtype, device
        self.sampler = sampler
        # Most tokens behind the target a sequence is after a step: itself and its drafts.
        self.max_catch_up = config.max_query_len
        self.vocab_size = draft.config.vocab_size
        self.runner: DraftRunner | None = None  # once prepared
        # request -> (tokens whose KV the draft holds, the request's preemptions when it last drafted)
        self._held: WeakKeyDictionary[Request, tuple[int, int]] = WeakKeyDictionary()

    @classmethod
    def create(cls, ctx: ProposerContext) -> DraftModelProposer:
        return cls(load_draft(ctx.config, ctx.target, ctx.dtype, ctx.device), ctx.config, ctx.sampler, ctx.dtype,
                   ctx.device)

    def prepare(self, num_blocks: int, max_model_len: int) -> None:
        config = self.config
        self.runner = DraftRunner(self.draft.model, num_blocks, config.block_size, self.dtype, self.device)
        if self.runner.fused and not config.enforce_eager:
            # A greedy proposal is one graph (catch-up pass and k - 1 chained passes at most); after
            # a long catch-up, the passes after it are one chain.
            self.runner.capture_graphs(config.max_num_seqs, config.max_query_len, max_model_len,
                                       config.max_num_batched_tokens, config.num_speculative_tokens - 1,
                                       proposals=True)

    def observe(self, spec, num_accepted, hidden_states) -> None:
        """Past the accepted tokens the draft holds rejected drafts: not held, even once a step without drafts
        has computed those positions (held_tokens counts no further than the target's computed tokens)."""
        for s in spec:  # after the verification is applied: the last token is the target's, not yet drafted from
            request = s.request
            held, preemptions = self._held.get(request, (0, request.num_preemptions))
            self._held[request] = (min(held, request.num_tokens - 1), preemptions)

    def held_tokens(self, request: Request) -> int:
        """Tokens of request's history whose KV the draft holds and the target has confirmed."""
        held, preemptions = self._held.get(request, (0, request.num_preemptions))
        return min(held, request.num_computed_tokens) if preemptions == request.num_preemptions else 0

    def propose(self, spec: list[ScheduledRequest], pool: BlockPool) -> Proposal:
        """Draft s.num_spec_slots tokens for each s, on the device (Proposal.device_drafts, row r for
        spec[r]); q where some request drafts by sampling. s.draft_token_ids gets placeholders of the
        right length: the host learns the drafts after the target's pass, which reads them on the
        device."""
        ks = [s.num_spec_slots for s in spec]
        depth = max(ks)
        tables = [pool.block_table(s.request.request_id) for s in spec]
        items = [self._catch_up(s.request, table) for s, table in zip(spec, tables)]
        active = list(range(len(spec)))
        batch, batch_rows = self._rows(spec, active), active
        device, model = self.runner.device, self.runner.model
        if batch is None and min(ks) == depth:
            # Greedy at one depth for all, every catch-up short: the whole proposal is one graph replay.
            proposal = self.runner.greedy_proposal(items, depth - 1)
            if proposal is not None:
                return Proposal(self._drafted(spec, ks, proposal))
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
                batch, batch_rows = self._rows(spec, active), active
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
        return Proposal(self._drafted(spec, ks, drafted), q)

    def _rows(self, spec: list[ScheduledRequest], rows: list[int]):
        return draft_rows([spec[r].request for r in rows], self.vocab_size, self.device)

    def _drafted(self, spec: list[ScheduledRequest], ks: list[int], drafted: torch.Tensor) -> torch.Tensor:
        for s, k in zip(spec, ks):
            s.draft_token_ids = [0] * k
            # It has seen the known tokens and every draft but the last.
            self._held[s.request] = (s.request.num_tokens + k - 1, s.request.num_preemptions)
        return drafted

    @staticmethod
    def _next_items(spec: list[ScheduledRequest], rows: list[int], tables: list[list[int]], j: int):
        """Pass j (j >= 1) computes the draft j made before it: one token at num_tokens + j - 1."""
        return [ForwardItem([0], spec[row].request.num_tokens + j - 1, tables[row], 1) for row in rows]

    def _catch_up(self, request: Request, table: list[int]) -> ForwardItem:
        start = min(self.held_tokens(request), request.num_tokens - 1)
        tokens = request.all_token_ids[start:]
        # A short catch-up (the tokens accepted last step) asks for logits at every position, so the
        # pass has the shape of a verification step and can replay a CUDA graph; only the last is used.
        return ForwardItem(tokens, start, table, len(tokens) if len(tokens) <= self.max_catch_up else 1)
