"""One step's model work: draft (when speculating), one target forward over the mixed batch,
then sampling or verification. Speculation is entered from here only: the depth before
scheduling, drafts before the target's pass, verification after it, the step's time at its end.

A step runs one of two ways: `execute` returns its tokens on the host; `launch` leaves them on the
device, where the next step's inputs read them, and `collect` brings them to the host later. Either way, what a
step computed goes to the requests through the scheduler (Scheduler.advance, update_from_output), never from here."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from itertools import compress
from operator import attrgetter

import numpy as np
import torch

from scheduler.core.outputs import TokenLogprob
from scheduler.core.request import Request
from scheduler.core.scheduler import (
    PlainTokens,
    ScheduledRequest,
    Scheduler,
    StepOutput,
    StepResult,
    batch_requests,
    columns,
)
from scheduler.loop.row_inputs import RowInputs
from scheduler.loop.token_copies import TokenCopies, logprob_lists, packed, unpacked
from scheduler.sampling import prompt_logprobs
from scheduler.sampling.draw import PendingDraw, TokenDrawer
from scheduler.sampling.picking import argmax_only, deferrable, greedy_verify, positions_differ
from scheduler.sampling.rows import sampling_rows
from scheduler.sampling.sampler import Sampler, logprobs_of
from scheduler.speculative.loop import DraftStepInFlight, SpeculativeLoop, device_inputs
from scheduler.speculative.proposer import Proposal
from scheduler.speculative.speculator import Speculator
from scheduler.structured.guide import TokenMasks, masked_argmax, settle_drafts
from scheduler.worker.runner import ForwardItem, ModelRunner


@dataclass
class StepInFlight:
    """A launched step whose sampled tokens the host has not read yet: row i of token_ids (on the device) is
    requests[i]'s, drawn (`draw`) once its grammar masks are filled (StepExecutor.finish_draw); `host` receives
    them (with their logprobs, num_top a token, where asked), complete once `copied` (None on the CPU) is done.
    `results`: its tokens once read, which the next step's launch does early when its grammar masks follow them."""

    requests: list[Request]
    row_of: dict[Request, int] | None  # each request's row (None: worked out when asked, from requests)
    token_ids: torch.Tensor | None = None  # None until drawn
    num_top: int | None = None
    host: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None
    results: list[StepResult] | PlainTokens | None = None
    draw: PendingDraw | None = None
    slots: np.ndarray | None = None  # the requests' Progress slots

    @property
    def rows(self) -> dict[Request, int]:
        if self.row_of is None:
            self.row_of = dict(zip(self.requests, range(len(self.requests))))
        return self.row_of

    def device_outputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Its tokens on the device, one a row [R, 1], and their counts (None: one each)."""
        assert self.token_ids is not None, "drawn first (StepExecutor.finish_draw)"
        return self.token_ids.view(-1, 1), None


@dataclass
class Verification:
    """A launched step with drafts (or one run the synchronous way): the target's logits, waiting to be
    sampled or verified on the host."""

    batch: list[ScheduledRequest]
    spec: list[ScheduledRequest]
    proposal: Proposal | None
    logits: torch.Tensor
    hidden: torch.Tensor | None
    cached: bool = False  # the blocks it fills are in the prefix cache already
    masks: Future | None = None  # its drafts' grammar masks (TokenMasks.fill_drafts), filled meanwhile


class StepExecutor:
    def __init__(self, runner: ModelRunner, sampler: Sampler, scheduler: Scheduler,
                 speculator: Speculator | None = None):
        """scheduler: the one writer of request progress; steps hand it what they computed."""
        self.runner = runner
        self.sampler = sampler
        self.scheduler = scheduler
        self.pool = scheduler.pool
        self.speculator = speculator
        self.vocab_size = runner.model.config.vocab_size
        self.device = runner.device
        self.masks = TokenMasks(self.vocab_size, self.device)
        self.drawer = TokenDrawer(sampler, self.masks, self.vocab_size, self.device, scheduler.progress)
        self.copies = TokenCopies(self.device)
        self.loop: SpeculativeLoop | None = None
        self.progress = scheduler.progress
        self.row_inputs = RowInputs(self.pool, scheduler.max_num_seqs, self.progress)  # per-row state kept across steps

    def speculate_in_loop(self, max_rows: int, max_model_len: int) -> None:
        """Verify drafts inside the overlapped loop (speculative/loop.py), where the proposer drafts on the
        device from the step in flight's tokens (a lookup over token histories, an EAGLE head's chain); the other
        proposers draft on the host, and a step with their drafts waits for the one before."""
        proposer = self.speculator.proposer if self.speculator is not None else None
        if (hasattr(proposer, "propose_on_device") or hasattr(proposer, "propose_in_loop")) \
                and not proposer.needs_hidden_states:
            self.loop = SpeculativeLoop(self.runner, self.scheduler, self.speculator.proposer, self.copies, max_rows,
                                        max_model_len, self.speculator.k_max)

    def plan(self, num_decodes: int, prefill: bool) -> int:
        """Draft tokens a decoding sequence may verify in the next step (0 without speculation)."""
        return self.speculator.plan(num_decodes, prefill) if self.speculator is not None else 0

    def observe_step(self, batch: list[ScheduledRequest], prefill: bool, seconds: float,
                     overlapped: bool = False) -> None:
        """The whole step's wall time; steps with prompt chunks are timed apart (their own buckets). overlapped:
        the step was launched and the one before collected (its time is mostly the device's work on that one)."""
        if self.speculator is not None and batch:
            num_decodes = sum(1 for s in batch if s.samples and s.num_new_tokens == 1)
            # On the CPU a launch computes its step before it returns: the time is this step's own work.
            self.speculator.observe_step(num_decodes, prefill, seconds, overlapped and self.device.type != "cpu")

    def execute(self, batch: list[ScheduledRequest]) -> list[StepResult]:
        """Run a step and return its tokens, on the host."""
        return self._finish(self._start(batch))

    def can_defer(self, batch: list[ScheduledRequest]) -> bool:
        """Whether the step may run ahead of the host (sampling/picking.py says which may): at once where no row
        has penalties or prompt logprobs."""
        slots = columns(batch, self.progress)[0]
        return (slots is not None and not self.progress.synchronous[slots].any()) or deferrable(batch)

    def launch(self, batch: list[ScheduledRequest], previous: StepInFlight | DraftStepInFlight | None
               ) -> StepInFlight | DraftStepInFlight | Verification:
        """Run a step (can_defer) without waiting for its outcome. A step without drafts leaves its tokens on
        the device; the step before's, still in flight, are its placeholders' inputs, read from there. A step
        with drafts does too where the loop verifies them (self.loop); else it waits for the step before."""
        self.finish_draw(previous)  # its tokens are this step's inputs
        if any(map(_SPEC_SLOTS, batch)):
            if self.loop is not None and self.loop.accepts(batch):
                return self.loop.launch(batch, previous, self._item)
            if previous is not None:
                self.collect(previous)  # the host drafts from, and verifies with, every token
            return self._start(batch)
        tokens, shifts = device_inputs(previous)  # shifts: where the step in flight verified drafts
        if isinstance(previous, StepInFlight) and previous.slots is not None:
            gathered = self.row_inputs.gather(batch, device_slots=previous.slots)
            on_device = len(previous.slots) > 0
        else:
            rows = previous.rows if previous is not None else {}
            gathered, on_device = self.row_inputs.gather(batch, rows), bool(rows)
        logits = self.runner.forward(gathered.inputs, device_tokens=tokens if on_device else None,
                                     device_shifts=shifts)
        if self.speculator is not None:
            self.speculator.observe_forward(batch, gathered.inputs, self.runner)
        self.scheduler.advance(batch)
        self.row_inputs.cache_filled_blocks(batch, gathered)
        slots, _, samples = columns(batch, self.progress)
        requests = batch_requests(batch)
        if not samples.all():
            requests, slots = list(compress(requests, samples)), slots[samples]
        if previous is not None and self.progress.guided[slots].any():
            self.collect(previous)  # the masks follow its tokens; the device runs the forward meanwhile
        step = StepInFlight(requests, None, draw=self.drawer.draw_later(logits, requests, slots), slots=slots)
        self.scheduler.add_placeholders(requests, slots)
        if not step.draw.waiting:
            self.finish_draw(step)
        return step

    def finish_draw(self, step: StepInFlight | DraftStepInFlight | Verification | None) -> None:
        """Draw a launched step's tokens once its grammar masks are filled, and start their copy to the host: the
        engine calls it after the work its thread did meanwhile; what reads the tokens calls it first."""
        if isinstance(step, StepInFlight) and step.token_ids is None:
            out = step.draw.result()
            step.token_ids = out.token_ids
            step.num_top = out.top_logprobs.shape[1] if out.logprobs is not None else None
            step.host, step.copied = self.copies.start(packed(out))

    def collect(self, step: StepInFlight | DraftStepInFlight | Verification) -> list[StepResult]:
        """A launched step's tokens, appended to their requests. A request that has ended since (a stop in the
        step before, an abort) takes none: never an extra token."""
        if isinstance(step, Verification):
            return self._finish(step)
        if step.results is None:
            step.results = self._read(step) if isinstance(step, StepInFlight) else self._read_verified(step)
        return step.results

    def _read_verified(self, step: DraftStepInFlight) -> list[StepResult]:
        """Wait for a step verified in the loop; its tokens applied, its acceptance learnt (a step late)."""
        out = step.output()
        self.speculator.observe_counts(step.num_spec, [len(d) for d in out.drafts], out.num_accepted)
        return self.scheduler.update_from_output(out)

    def _read(self, step: StepInFlight) -> list[StepResult]:
        """Wait for a launched step's tokens and have them applied."""
        self.finish_draw(step)
        if step.copied is not None:
            step.copied.synchronize()
        token_ids, logprobs = unpacked(step.host.numpy(), step.num_top)
        return self.scheduler.update_from_output(StepOutput(step.requests, token_ids, logprobs, in_flight=True,
                                                            slots=step.slots))

    def _start(self, batch: list[ScheduledRequest]) -> Verification:
        """Drafts, then the target's pass; the logits wait in the Verification."""
        spec = [s for s in batch if s.num_spec_slots] if any(map(_SPEC_SLOTS, batch)) else []
        proposal = self.speculator.propose(spec, self.pool) if spec else None
        masks = self._draft_masks_later(batch, proposal)
        drafts = proposal.device_drafts if proposal is not None else None
        rows = {id(s): r for r, s in enumerate(spec)} if drafts is not None else {}
        slots = columns(batch, self.progress)[0]
        prompt_rows = [prompt_logprobs.prompt_rows(s.request, s.num_new_tokens) for s in batch] \
            if slots is None or self.progress.asks_prompt_logprobs[slots].any() else None
        collects = prompt_rows is not None and any(count for _, count in prompt_rows)  # prompt logprobs
        if spec or collects:
            items = [self._item(s, rows.get(id(s), -1), first if count else None)
                     for s, (first, count) in zip(batch, prompt_rows or [(0, 0)] * len(batch))]
        else:  # every row's tokens known: the persistent batch's
            gathered = self.row_inputs.gather(batch, {})
            items = gathered.inputs
        hidden = None
        if self.speculator is not None and self.speculator.proposer.needs_hidden_states:
            logits, hidden = self.runner.forward(items, device_tokens=drafts, with_hidden=True)
        else:
            logits = self.runner.forward(items, device_tokens=drafts)
        if self.speculator is not None:
            self.speculator.observe_forward(batch, items, self.runner)
        if collects:
            logits, hidden = prompt_logprobs.take(logits, hidden, [s.request for s in batch],
                                                  [item.num_logits for item in items], prompt_rows)
        self.scheduler.advance(batch)
        if isinstance(items, list):
            return Verification(batch, spec, proposal, logits, hidden, masks=masks)
        self.row_inputs.cache_filled_blocks(batch, gathered)
        return Verification(batch, spec, proposal, logits, hidden, cached=True, masks=masks)

    def _finish(self, step: Verification) -> list[StepResult]:
        """Sample or verify; the requests that have ended since the step was launched take nothing."""
        sampled = [s for s in step.batch if s.samples]
        if any(map(_DRAFTS, sampled)):
            target_ids = None
            if step.proposal.device_drafts is not None:  # one copy brings the drafts and, if greedy, the target's picks
                target_ids = _learn_drafts(step.spec, step.proposal.device_drafts,
                                           step.logits if greedy_verify(sampled) else None)
            results = self._verify(step.logits, sampled, step.proposal.draft_probs, target_ids, step.hidden,
                                   step.masks)
        else:
            results = self._sample(step.logits, sampled, step.masks)
        if not step.cached:
            self._cache_blocks(step.batch)
        return results

    def _cache_blocks(self, batch: list[ScheduledRequest]) -> None:
        """Put the blocks the step filled into the prefix cache, up to the tokens the host knows."""
        if self.pool.enable_prefix_caching:
            self.pool.cache_filled_blocks([s.request for s in batch])

    def _item(self, s: ScheduledRequest, device_row: int = -1, first_logit: int | None = None) -> ForwardItem:
        """device_row: the row of the device tokens that holds this item's drafts, or its placeholder (a token
        of the step in flight). first_logit: the position from which on every token's logits are wanted (prompt
        logprobs)."""
        request, drafts = s.request, s.draft_token_ids
        start = request.num_computed_tokens
        if s.num_new_tokens == 1 and not drafts and first_logit is None:  # a decode, most rows: no slicing
            known = start < len(request.all_token_ids)  # else its token is a placeholder, on the device
            assert known or device_row >= 0
            return ForwardItem([request.all_token_ids[start]] if known else [0], start,
                               self.pool.block_table(request.request_id), 1 if s.samples else 0, device_row,
                               0 if known else 1)
        tokens = request.all_token_ids[start:start + s.num_new_tokens]  # the known ones: a list of its own
        num_placeholders = s.num_new_tokens - len(tokens)
        assert not (num_placeholders and drafts) and (device_row >= 0 or not num_placeholders)
        if num_placeholders:
            tokens += [0] * num_placeholders
        if drafts:
            tokens += drafts
        num_logits = 1 + len(drafts) if s.samples else 0
        if first_logit is not None:
            num_logits = max(num_logits, start + s.num_new_tokens - first_logit)
        num_device_tokens = (len(drafts) or num_placeholders) if device_row >= 0 else 0
        return ForwardItem(tokens, start, self.pool.block_table(request.request_id), num_logits, device_row,
                           num_device_tokens)

    def _sample(self, logits: torch.Tensor, sampled: list[ScheduledRequest], masks: Future | None = None
                ) -> list[StepResult]:
        """masks: the rows' grammar masks, filled meanwhile (_draft_masks_later, where no row had drafts)."""
        if not sampled:
            return []
        requests = [s.request for s in sampled]
        out = self.drawer.draw(logits, requests, self.progress.slots_of(requests),
                               masks.result()[0] if masks is not None else None)
        logprobs = [[lp] for lp in logprob_lists(out.token_ids, out.logprobs, out.top_logprobs, out.top_token_ids)] \
            if out.logprobs is not None else None
        return self.scheduler.update_from_output(StepOutput(requests, out.token_ids.tolist(), logprobs))

    def _verify(self, logits: torch.Tensor, sampled: list[ScheduledRequest], draft_probs,
                target_ids: list[int] | None, hidden: torch.Tensor | None, masks: Future | None = None
                ) -> list[StepResult]:
        requests = [s.request for s in sampled]
        if greedy_verify(sampled):
            # Greedy verification is an argmax comparison: one argmax over every verified position,
            # one copy to the host, no sampling rows.
            if target_ids is None:
                target_ids = logits.argmax(dim=-1).tolist()
            num_accepted, next_tokens = self.speculator.verify_greedy(target_ids, sampled)
        elif argmax_only(requests):
            # Greedy rows under grammars: the same argmax comparison, each verified position's argmax taken
            # among the tokens its grammar allows there (what the sampler's one-hot would pick).
            host, walked = self._draft_masks(sampled, masks)
            target_ids = masked_argmax(logits, self.masks.to_device(host)).tolist()
            num_accepted, next_tokens = self.speculator.verify_greedy(target_ids, sampled)
            settle_drafts(list(map(_GUIDE, requests)), list(map(_DRAFTS, sampled)), walked, num_accepted,
                          next_tokens, host)
        else:
            per_request = sampling_rows(requests, self.vocab_size, self.device)
            if any(positions_differ(r) for r in requests):
                rows = sampling_rows(requests, self.vocab_size, self.device, [s.draft_token_ids for s in sampled])
            else:  # every verified position samples as its request does: the rows are copied on the device
                rows = per_request.repeat_rows([1 + len(s.draft_token_ids) for s in sampled])
            host, walked = self._draft_masks(sampled, masks)
            rows.token_bitmask = self.masks.to_device(host) if host is not None else None
            target_probs = self.sampler.compute_probs(logits, rows)
            num_accepted, next_tokens = self.speculator.verify(target_probs, sampled, draft_probs, per_request)
            if host is not None:
                settle_drafts(list(map(_GUIDE, requests)), list(map(_DRAFTS, sampled)), walked, num_accepted,
                              next_tokens, host)
        logprobs = _verified_logprobs(logits, sampled, num_accepted, next_tokens) \
            if any(r.params.logprobs for r in requests) else None
        results = self.scheduler.update_from_output(StepOutput(
            requests, next_tokens, logprobs, [s.draft_token_ids for s in sampled], num_accepted))
        self.speculator.observe(sampled, num_accepted, hidden)
        return results

    def _draft_masks_later(self, batch: list[ScheduledRequest], proposal: Proposal | None) -> Future | None:
        """Where the host knows the drafts (lookups), the grammars' masks of every position to verify (of each
        row's next token where none was drafted), filled on the helper thread while the target's pass runs."""
        if proposal is None or proposal.device_drafts is not None:
            return None
        sampled = [s for s in batch if s.samples]
        if all(s.request.guide is None for s in sampled):
            return None
        return self.masks.fill_drafts_later([s.request.guide for s in sampled], list(map(_DRAFTS, sampled)))

    def _draft_masks(self, sampled: list[ScheduledRequest], masks: Future | None
                     ) -> tuple[torch.Tensor | None, list[int]]:
        """The grammar masks of every verified position (masked verification), host rows, or None where no
        grammar constrains the step; how many drafts each guide walked, to roll back after verification.
        masks: those filled already (_draft_masks_later)."""
        if masks is not None:
            return masks.result()
        if all(s.request.guide is None for s in sampled):
            return None, [0] * len(sampled)
        return self.masks.fill_drafts([s.request.guide for s in sampled], list(map(_DRAFTS, sampled)))


_REQUEST, _GUIDE, _SPEC_SLOTS = attrgetter("request"), attrgetter("guide"), attrgetter("num_spec_slots")
_DRAFTS = attrgetter("draft_token_ids")


def _verified_logprobs(logits: torch.Tensor, sampled: list[ScheduledRequest], num_accepted: list[int],
                       next_tokens: list[int]) -> list[list[TokenLogprob] | None]:
    """The logprobs of each verified request's new tokens (accepted drafts and the next), where it asks."""
    logprobs, row = [], 0
    for s, n, token in zip(sampled, num_accepted, next_tokens):
        request, lps = s.request, None
        if request.params.logprobs and not request.is_finished:
            chosen = torch.tensor(s.draft_token_ids[:n] + [token], device=logits.device)
            idx = torch.arange(row, row + len(chosen), device=logits.device)
            lps = logprob_lists(chosen, *logprobs_of(logits[idx], chosen, request.params.logprobs))
        logprobs.append(lps)
        row += 1 + len(s.draft_token_ids)
    return logprobs


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
