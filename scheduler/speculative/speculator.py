"""Speculation in the step: the depth of each step, the proposer's drafts before the target's pass,
and lossless verification after it. The step executor is its one caller."""

from __future__ import annotations

import torch

from scheduler.config import EngineConfig
from scheduler.core.kv_cache import BlockPool
from scheduler.core.scheduler import ScheduledRequest
from scheduler.sampling.batch import SamplingBatch
from scheduler.sampling.sampler import Sampler
from scheduler.speculative.best import best_proposer
from scheduler.speculative.depth import AdaptiveDepth
from scheduler.speculative.proposer import Proposal, Proposer, ProposerContext
from scheduler.speculative.registry import proposer_class
from scheduler.speculative.rejection import verify, verify_greedy


def build_proposer(ctx: ProposerContext) -> Proposer | None:
    """The proposer config.speculative names; None when off."""
    name = ctx.config.speculative
    if name == "off":
        return None
    if name == "best":
        name = best_proposer(ctx.config, ctx.target)
    return proposer_class(name).create(ctx)


class Speculator:
    def __init__(self, proposer: Proposer, k_max: int, sampler: Sampler, adaptive: bool = True):
        self.proposer = proposer
        self.k_max = k_max
        self.sampler = sampler
        self.depth = AdaptiveDepth(k_max, fixed=not adaptive)
        self.step_k = 0
        self.in_flight: tuple[int, int, bool] | None = None  # (num_decodes, depth, prefill) of the step in flight

    @classmethod
    def for_config(cls, config: EngineConfig, proposer: Proposer, sampler: Sampler) -> Speculator:
        return cls(proposer, config.num_speculative_tokens, sampler, adaptive=config.adaptive_speculation)

    def plan(self, num_decodes: int, prefill: bool) -> int:
        """This step's depth, from the load the scheduler is about to see."""
        self.step_k = self.depth.choose(num_decodes, prefill)
        return self.step_k

    def propose(self, spec: list[ScheduledRequest], pool: BlockPool) -> Proposal:
        proposal = self.proposer.propose(spec, pool)
        self.depth.observe_coverage(sum(1 for s in spec if s.draft_token_ids), len(spec))
        return proposal

    def verify(self, target_probs: torch.Tensor, sampled: list[ScheduledRequest], draft_probs, batch: SamplingBatch):
        """One row group per sampling request (k_r + 1 rows). Returns lists (num_accepted, next_token)."""
        num_drafts = [len(s.draft_token_ids) for s in sampled]
        if draft_probs is not None:
            draft_probs = self._per_sampled_row(draft_probs, sampled)
        num_accepted, next_tokens = verify(
            target_probs, num_drafts, [s.draft_token_ids for s in sampled], draft_probs, batch.is_greedy,
            batch.generators, lambda probs: self.sampler.sample_probs(probs, batch))
        num_accepted, next_tokens = torch.stack([num_accepted, next_tokens]).tolist()
        return num_accepted, next_tokens

    def verify_greedy(self, target_token_ids: list[int], sampled: list[ScheduledRequest]):
        """For greedy requests whose logits nothing changes: target_token_ids is the argmax of every
        verified position (k_r + 1 per request, in order). Returns lists (num_accepted, next_token)."""
        return verify_greedy(target_token_ids, [s.draft_token_ids for s in sampled])

    def observe(self, sampled: list[ScheduledRequest], num_accepted: list[int],
                hidden_states: torch.Tensor | None = None) -> None:
        """After verification of the sampled requests (those without drafts included)."""
        spec = [(s, n) for s, n in zip(sampled, num_accepted) if s.num_spec_slots]
        for s, n in spec:
            if s.draft_token_ids:  # none at all is coverage's business
                # A proposal shorter than the depth asked for fails where it ends: the expected tokens
                # of a depth must count what the proposer can actually fill.
                self.depth.observe_acceptance(s.num_spec_slots, n)
        if not spec:
            return
        if hidden_states is not None:  # keep the rows of the speculating requests
            rows, start = [], 0
            for s in sampled:
                if s.num_spec_slots:
                    rows.extend(range(start, start + 1 + len(s.draft_token_ids)))
                start += 1 + len(s.draft_token_ids)
            hidden_states = hidden_states[torch.tensor(rows, device=hidden_states.device)]
        self.proposer.observe([s for s, _ in spec], [n for _, n in spec], hidden_states)

    def observe_counts(self, num_spec: list[int], num_drafts: list[int], num_accepted: list[int]) -> None:
        """After verification on the device (speculative/loop.py), one entry a sampled row: the drafts it had
        room for (0: it did not speculate), those proposed, those accepted."""
        speculating = [(k, d, n) for k, d, n in zip(num_spec, num_drafts, num_accepted) if k]
        for k, d, n in speculating:
            if d:  # as observe: a proposal shorter than the depth fails where it ends
                self.depth.observe_acceptance(k, n)
        self.depth.observe_coverage(sum(1 for _, d, _ in speculating if d), len(speculating))

    def observe_forward(self, batch: list[ScheduledRequest], items: list, runner) -> None:
        """After every target pass: the streams a proposer reads the target with (aux_layers), if any."""
        if self.proposer.aux_layers is not None:
            # Requests that do not speculate too: their blocks may reach the prefix cache, whose blocks must
            # hold what the proposer reads (a head's rows) for the requests that speculate from them.
            self.proposer.observe_forward(batch, items, *runner.aux_hidden_states(items))

    def observe_step(self, num_decodes: int, prefill: bool, seconds: float, overlapped: bool = False) -> None:
        """The whole step's wall time, with this step's depth. An overlapped step waits for the device to finish
        the step before: its time counts for that step's depth and load (timed on this one's, a depth just
        switched to would take its predecessor's cost)."""
        step = (num_decodes, self.step_k, prefill)
        if overlapped:
            step, self.in_flight = self.in_flight, step
            if step is None:
                return
        else:
            self.in_flight = None
        self.depth.observe_step(step[0], step[1], seconds, step[2])

    @staticmethod
    def _per_sampled_row(draft_probs: torch.Tensor, sampled: list[ScheduledRequest]) -> torch.Tensor:
        """q was built for the speculating requests only; give the others all-zero rows."""
        rows, spec_row = [], 0
        for s in sampled:
            rows.append(spec_row if s.num_spec_slots else -1)
            spec_row += bool(s.num_spec_slots)
        padded = torch.cat([draft_probs, draft_probs.new_zeros(1, *draft_probs.shape[1:])])
        return padded[torch.tensor(rows, device=draft_probs.device)]
