"""One step's model work: draft (when speculating), one target forward over the mixed batch,
then sampling or verification. Advances each request's tokens and KV bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scheduler.kv_cache import BlockPool
from scheduler.outputs import TokenLogprob
from scheduler.request import Request
from scheduler.runner import ForwardItem, ModelRunner
from scheduler.sampling import Sampler, SamplingBatch, logprobs_of
from scheduler.scheduler import ScheduledRequest


@dataclass
class StepResult:
    request: Request
    new_token_ids: list[int]  # already appended to the request
    logprobs: list[TokenLogprob] | None
    num_drafts: int = 0
    num_accepted: int = 0


class StepExecutor:
    def __init__(self, runner: ModelRunner, sampler: Sampler, pool: BlockPool, generators: dict,
                 speculator=None):
        self.runner = runner
        self.sampler = sampler
        self.pool = pool
        self.generators = generators  # request_id -> torch.Generator for seeded requests
        self.speculator = speculator
        self.vocab_size = runner.model.config.vocab_size
        self.device = runner.device

    def execute(self, batch: list[ScheduledRequest]) -> list[StepResult]:
        spec = [s for s in batch if s.num_spec_slots]
        draft_probs = None
        if spec:
            draft_probs = self.speculator.propose(spec, self.pool, lambda rows: self._sampling_batch(
                [spec[r].request for r in rows]))
        logits = self.runner.forward([self._item(s) for s in batch])
        sampled = [s for s in batch if s.samples]
        for s in batch:
            s.request.num_computed_tokens += s.num_new_tokens
        if any(s.draft_token_ids for s in sampled):
            results = self._verify(logits, sampled, draft_probs)
        else:
            results = self._sample(logits, sampled)
        for s in batch:
            self.pool.cache_full_blocks(s.request, s.request.num_computed_tokens)
        return results

    def _item(self, s: ScheduledRequest) -> ForwardItem:
        request = s.request
        start = request.num_computed_tokens
        tokens = request.all_token_ids[start:start + s.num_new_tokens] + s.draft_token_ids
        num_logits = 1 + len(s.draft_token_ids) if s.samples else 0
        return ForwardItem(tokens, start, self.pool.block_table(request.request_id), num_logits)

    def _sample(self, logits: torch.Tensor, sampled: list[ScheduledRequest]) -> list[StepResult]:
        if not sampled:
            return []
        requests = [s.request for s in sampled]
        out = self.sampler(logits, self._sampling_batch(requests))
        token_ids = out.token_ids.tolist()
        logprobs = _logprob_lists(out.token_ids, out.logprobs, out.top_logprobs, out.top_token_ids) \
            if out.logprobs is not None else [None] * len(requests)
        results = []
        for request, token, lp in zip(requests, token_ids, logprobs):
            request.append_token(token)
            results.append(StepResult(request, [token], [lp] if request.params.logprobs else None))
        return results

    def _verify(self, logits: torch.Tensor, sampled: list[ScheduledRequest], draft_probs) -> list[StepResult]:
        requests = [s.request for s in sampled]
        rows = self._sampling_batch(requests, [s.draft_token_ids for s in sampled])
        target_probs = self.sampler.compute_probs(logits, rows)
        num_accepted, next_tokens = self.speculator.verify(target_probs, sampled, draft_probs,
                                                           self._sampling_batch(requests))
        wants_logprobs = max(r.params.logprobs for r in requests)
        results, row = [], 0
        for s, n, token in zip(sampled, num_accepted, next_tokens):
            request = s.request
            new_tokens = s.draft_token_ids[:n] + [token]
            for t in new_tokens:
                request.append_token(t)
            request.num_computed_tokens += n
            request.num_draft_computed_tokens = min(request.num_draft_computed_tokens, request.num_computed_tokens)
            request.num_draft_tokens += len(s.draft_token_ids)
            request.num_accepted_tokens += n
            lps = None
            if wants_logprobs and request.params.logprobs:
                idx = torch.arange(row, row + len(new_tokens), device=logits.device)
                lps = _logprob_lists(torch.tensor(new_tokens, device=logits.device),
                                     *logprobs_of(logits[idx], torch.tensor(new_tokens, device=logits.device),
                                                  request.params.logprobs))
            results.append(StepResult(request, new_tokens, lps, len(s.draft_token_ids), n))
            row += 1 + len(s.draft_token_ids)
        return results

    def _sampling_batch(self, requests: list[Request], drafts: list[list[int]] | None = None) -> SamplingBatch:
        """One row per request, or with drafts one row per verified position: row i of a request
        sees the drafts before it as already generated (penalties and min_tokens follow them)."""
        params, prompts, outputs, generators, blocked = [], [], [], [], []
        for j, request in enumerate(requests):
            positions = range(len(drafts[j]) + 1) if drafts is not None else [0]
            for i in positions:
                history = request.output_token_ids + (drafts[j][:i] if drafts is not None else [])
                params.append(request.params)
                prompts.append(request.prompt_token_ids)
                outputs.append(history)
                generators.append(self.generators.get(request.request_id) if drafts is None else None)
                blocked.append(blocked_ids(request, len(history)))
        return SamplingBatch.build(params, prompts, outputs, generators, blocked, self.vocab_size, self.device)


def blocked_ids(request: Request, num_output_tokens: int) -> list[int]:
    """Tokens that would end the request before min_tokens."""
    params = request.params
    if num_output_tokens >= params.min_tokens:
        return []
    return list(params.stop_token_ids) + ([] if params.ignore_eos else list(request.eos_token_ids))


def _logprob_lists(token_ids, chosen, top_values, top_ids) -> list[TokenLogprob]:
    ids, chosen = token_ids.tolist(), chosen.tolist()
    top_ids, top_values = top_ids.tolist(), top_values.tolist()
    return [TokenLogprob(t, lp, list(zip(ti, tv))) for t, lp, ti, tv in zip(ids, chosen, top_ids, top_values)]
