"""One step's model work: draft (when speculating), one target forward over the mixed batch,
then sampling or verification. Advances each request's tokens and KV bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scheduler.core.kv_cache import BlockPool
from scheduler.core.request import Request
from scheduler.core.scheduler import ScheduledRequest
from scheduler.io.outputs import TokenLogprob
from scheduler.sampling.sampler import Sampler, SamplingBatch, logprobs_of
from scheduler.worker.runner import ForwardItem, ModelRunner


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
        draft_probs = drafts = None
        if spec:
            draft_probs, drafts = self.speculator.propose(spec, self.pool, lambda rows: self._draft_sampling(
                [spec[r].request for r in rows]))
        rows = {id(s): r for r, s in enumerate(spec)} if drafts is not None else {}
        logits = self.runner.forward([self._item(s, rows.get(id(s), -1)) for s in batch], device_tokens=drafts)
        sampled = [s for s in batch if s.samples]
        for s in batch:
            s.request.num_computed_tokens += s.num_new_tokens
        if any(s.draft_token_ids for s in sampled):
            target_ids = None
            if drafts is not None:  # one copy to the host brings the drafts and, if greedy, the target's picks
                target_ids = self._learn_drafts(spec, drafts, logits if self._greedy_verify(sampled) else None)
            results = self._verify(logits, sampled, draft_probs, target_ids)
        else:
            results = self._sample(logits, sampled)
        for s in batch:
            self.pool.cache_full_blocks(s.request, s.request.num_computed_tokens)
        return results

    def _item(self, s: ScheduledRequest, device_row: int = -1) -> ForwardItem:
        request = s.request
        start = request.num_computed_tokens
        tokens = request.all_token_ids[start:start + s.num_new_tokens] + s.draft_token_ids
        num_logits = 1 + len(s.draft_token_ids) if s.samples else 0
        return ForwardItem(tokens, start, self.pool.block_table(request.request_id), num_logits, device_row,
                           len(s.draft_token_ids) if device_row >= 0 else 0)

    @staticmethod
    def _learn_drafts(spec: list[ScheduledRequest], drafts: torch.Tensor, logits: torch.Tensor | None):
        """Fill the spec requests' draft_token_ids from the device; with logits, also return the argmax
        of every verified row, in the same copy."""
        flat = drafts.reshape(-1)
        picks = None if logits is None else logits.argmax(dim=-1)
        values = (flat if picks is None else torch.cat([picks, flat])).tolist()
        offset = 0 if picks is None else picks.shape[0]
        width = drafts.shape[1]
        for r, s in enumerate(spec):
            start = offset + r * width
            s.draft_token_ids = values[start:start + len(s.draft_token_ids)]
        return None if picks is None else values[:offset]

    @staticmethod
    def _greedy_verify(sampled: list[ScheduledRequest]) -> bool:
        return all(plain_greedy(s.request) for s in sampled)

    def _sample(self, logits: torch.Tensor, sampled: list[ScheduledRequest]) -> list[StepResult]:
        if not sampled:
            return []
        requests = [s.request for s in sampled]
        if all(plain_greedy(r) and not r.params.logprobs for r in requests):
            return [self._append_one(r, token) for r, token in zip(requests, logits.argmax(dim=-1).tolist())]
        out = self.sampler(logits, self._sampling_batch(requests))
        token_ids = out.token_ids.tolist()
        logprobs = _logprob_lists(out.token_ids, out.logprobs, out.top_logprobs, out.top_token_ids) \
            if out.logprobs is not None else [None] * len(requests)
        return [self._append_one(request, token, lp) for request, token, lp in zip(requests, token_ids, logprobs)]

    @staticmethod
    def _append_one(request: Request, token: int, logprob: TokenLogprob | None = None) -> StepResult:
        request.append_token(token)
        return StepResult(request, [token], [logprob] if request.params.logprobs else None)

    def _verify(self, logits: torch.Tensor, sampled: list[ScheduledRequest], draft_probs,
                target_ids: list[int] | None = None) -> list[StepResult]:
        requests = [s.request for s in sampled]
        if self._greedy_verify(sampled):
            # Greedy verification is an argmax comparison: one argmax over every verified position,
            # one copy to the host, no sampling rows.
            if target_ids is None:
                target_ids = logits.argmax(dim=-1).tolist()
            num_accepted, next_tokens = self.speculator.verify_greedy(target_ids, sampled)
        else:
            per_request = self._sampling_batch(requests)
            if any(has_penalty(r.params) or blocked_ids(r, r.num_output_tokens) for r in requests):
                # Row i of a request sees the drafts before it as generated (penalties, min_tokens).
                rows = self._sampling_batch(requests, [s.draft_token_ids for s in sampled])
            else:  # every verified position samples as its request does: the rows are copied on the device
                rows = per_request.repeat_rows([1 + len(s.draft_token_ids) for s in sampled])
            target_probs = self.sampler.compute_probs(logits, rows)
            num_accepted, next_tokens = self.speculator.verify(target_probs, sampled, draft_probs, per_request)
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

    def _draft_sampling(self, requests: list[Request]) -> SamplingBatch | None:
        """How the draft model picks tokens for these requests; None when all draft greedily."""
        return None if all(plain_greedy(r) for r in requests) else self._sampling_batch(requests)

    def _sampling_batch(self, requests: list[Request], drafts: list[list[int]] | None = None) -> SamplingBatch:
        """One row per request, or with drafts one row per verified position: row i of a request
        sees the drafts before it as already generated (penalties and min_tokens follow them)."""
        params, prompts, outputs, generators, blocked = [], [], [], [], []
        for j, request in enumerate(requests):
            penalised = has_penalty(request.params)
            positions = range(len(drafts[j]) + 1) if drafts is not None else [0]
            for i in positions:
                params.append(request.params)
                prompts.append(request.prompt_token_ids if request.params.repetition_penalty != 1.0 else [])
                # Only penalties read the histories: copying them for other rows would cost O(length) each.
                drafted = drafts[j][:i] if drafts is not None else []
                outputs.append(request.output_token_ids + drafted if penalised else [])
                generators.append(self.generators.get(request.request_id) if drafts is None else None)
                blocked.append(blocked_ids(request, request.num_output_tokens + i))
        return SamplingBatch.build(params, prompts, outputs, generators, blocked, self.vocab_size, self.device)


def has_penalty(params) -> bool:
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


def plain_greedy(request: Request) -> bool:
    """Greedy, and nothing changes the logits it takes the argmax of (penalties, tokens blocked by
    min_tokens): its next token is the argmax of the raw logits, and so is every verified one."""
    return request.params.greedy and not has_penalty(request.params) and not blocked_ids(
        request, request.num_output_tokens)


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
