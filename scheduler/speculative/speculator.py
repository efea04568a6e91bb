"""Drafting before the target's forward pass, and verification after it."""

from __future__ import annotations

import torch

from scheduler.core.kv_cache import BlockPool
from scheduler.core.scheduler import ScheduledRequest
from scheduler.sampling.sampler import Sampler, SamplingBatch
from scheduler.speculative.depth import AdaptiveDepth
from scheduler.speculative.draft.proposer import DraftModelProposer
from scheduler.speculative.ngram import NgramProposer
from scheduler.speculative.rejection import verify, verify_greedy


class Speculator:
    def __init__(self, mode: str, k_max: int, sampler: Sampler, draft: DraftModelProposer | None = None,
                 ngram_min: int = 2, ngram_max: int = 4, adaptive: bool = True):
        assert mode in ("draft", "ngram") and (draft is not None) == (mode == "draft")
        self.mode = mode
        self.k_max = k_max
        self.sampler = sampler
        self.draft = draft
        self.ngram = NgramProposer(ngram_min, ngram_max)
        self.depth = AdaptiveDepth(k_max, fixed=not adaptive)
        self.step_k = 0

    def plan(self, num_decodes: int, prefill: bool) -> None:
        """Pick this step's depth from the load the scheduler is about to see."""
        self.step_k = self.depth.choose(num_decodes, prefill)

    def depth_for(self, request) -> int:
        if not request.speculative or self.step_k == 0:
            return 0
        cap = self.step_k if request.max_draft_tokens is None else min(self.step_k, request.max_draft_tokens)
        # The drafts' KV slots must stay within the request's token limit.
        return max(0, min(cap, request.max_total_tokens - request.num_tokens))

    def propose(self, spec: list[ScheduledRequest], pool: BlockPool, sampling_for):
        """Draft for the scheduled requests. Returns (q, device drafts): the draft's q, or None
        (one-hot); and with a draft model, the drafts as a device tensor, row r for spec[r], their
        draft_token_ids being placeholders until the host copies them (None: n-gram drafts are
        the host's own, in draft_token_ids)."""
        if self.mode == "draft":
            return self.draft.propose(spec, pool, sampling_for)
        for s in spec:
            s.draft_token_ids = self.ngram.propose(s.request, s.num_spec_slots)
        self.depth.observe_coverage(sum(1 for s in spec if s.draft_token_ids), len(spec))
        return None, None

    def verify(self, target_probs: torch.Tensor, sampled: list[ScheduledRequest], draft_probs, batch: SamplingBatch):
        """One row group per sampling request (k_r + 1 rows). Returns lists (num_accepted, next_token)."""
        num_drafts = [len(s.draft_token_ids) for s in sampled]
        if draft_probs is not None:
            draft_probs = self._per_sampled_row(draft_probs, sampled)
        num_accepted, next_tokens = verify(
            target_probs, num_drafts, [s.draft_token_ids for s in sampled], draft_probs, batch.is_greedy,
            batch.generators, lambda probs: self.sampler.sample_probs(probs, batch))
        num_accepted, next_tokens = torch.stack([num_accepted, next_tokens]).tolist()
        self._observe_acceptance(sampled, num_accepted)
        return num_accepted, next_tokens

    def verify_greedy(self, target_token_ids: list[int], sampled: list[ScheduledRequest]):
        """For greedy requests whose logits nothing changes: target_token_ids is the argmax of every
        verified position (k_r + 1 per request, in order). Returns lists (num_accepted, next_token)."""
        num_accepted, next_tokens = verify_greedy(target_token_ids, [s.draft_token_ids for s in sampled])
        self._observe_acceptance(sampled, num_accepted)
        return num_accepted, next_tokens

    def _observe_acceptance(self, sampled: list[ScheduledRequest], num_accepted: list[int]) -> None:
        for s, n in zip(sampled, num_accepted):
            if s.draft_token_ids:  # none at all is coverage's business
                # A proposal shorter than the depth asked for fails where it ends: the expected tokens
                # of a depth must count what the proposer can actually fill.
                self.depth.observe_acceptance(s.num_spec_slots, n)

    def observe_step(self, num_decodes: int, prefill: bool, seconds: float) -> None:
        """The whole step's wall time, with this step's depth."""
        self.depth.observe_step(num_decodes, self.step_k, seconds, prefill)

    @staticmethod
    def _per_sampled_row(draft_probs: torch.Tensor, sampled: list[ScheduledRequest]) -> torch.Tensor:
        """q was built for the speculating requests only; give the others all-zero rows."""
        rows, spec_row = [], 0
        for s in sampled:
            rows.append(spec_row if s.num_spec_slots else -1)
            spec_row += bool(s.num_spec_slots)
        padded = torch.cat([draft_probs, draft_probs.new_zeros(1, *draft_probs.shape[1:])])
        return padded[torch.tensor(rows, device=draft_probs.device)]
