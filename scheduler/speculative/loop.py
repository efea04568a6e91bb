"""Speculation inside the overlapped loop: a step with drafts is launched while the step before is still in
flight, its drafts proposed on the device from that step's tokens, and verified in its own launch; the host
learns the accepted counts a step later, as it learns tokens.

A lookup (n-gram) drafts from a device token history (DeviceHistory): each speculating request has a row, the host
writes the tokens it knows that the row lacks, the device appends the step in flight's. A proposer that reads the
target's streams (an EAGLE head, propose_in_loop) catches up over the step in flight's tokens itself, those it did
not accept dropped on the device, and chains its drafts from there; the target's streams of each pass are stored
where the device moved its rows. Verification (greedy: a draft stands while the target's argmax agrees) leaves
each row's new tokens and their count on the device, where the next step's inputs and positions read them
(ModelRunner.forward's device_shifts): the host planned that step as if no draft were accepted, and reserved KV
slots for all of them. When the counts arrive, accepted drafts count as computed (Scheduler.update_from_output);
the slots of rejected ones are simply written over later.

Requests whose tokens are not their logits' argmax (sampling, logprobs, grammars) verify the synchronous way
(StepExecutor._start); so do steps under tensor parallelism, and a head's steps whose requests draft to different
depths (its chain drafts one depth for all)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from scheduler.core.request import Request, RequestStatus
from scheduler.core.scheduler import ScheduledRequest, StepOutput
from scheduler.sampling.picking import verifiable_on_device
from scheduler.tensors import to_device
from scheduler.worker.packing import ForwardItem


@dataclass
class DraftStepInFlight:
    """A launched step with drafts verified on the device. Row i of tokens [R, W] holds requests[i]'s new
    tokens (accepted drafts, then the target's next), counts[i] of them; `host` receives [R, K + 3]: the
    drafts verified, the next token, the accepted count and the count of drafts (complete once `copied`).
    num_spec[i]: the drafts requests[i] had room for (0: it did not speculate)."""

    requests: list[Request]
    rows: dict[Request, int]
    tokens: torch.Tensor
    counts: torch.Tensor
    num_spec: list[int]
    host: torch.Tensor
    copied: torch.cuda.Event | None
    results: list | None = None

    def device_outputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.tokens, self.counts

    def output(self) -> StepOutput:
        """Wait for the copy; what the step verified, as the scheduler applies it."""
        if self.copied is not None:
            self.copied.synchronize()
        values = self.host.tolist()
        k = self.host.shape[1] - 3
        drafts = [row[:row[k + 2]] for row in values]
        return StepOutput(self.requests, [row[k] for row in values], None, drafts, [row[k + 1] for row in values],
                          in_flight=True)


class DeviceHistory:
    """Each speculating request's tokens on the device, one row a request, as the host knows them plus those of
    the step in flight. Rows are reused once their requests have ended (or, when none has, once they are not
    running: such a request is written again in full when it comes back). A last row takes the writes of rows
    that have none to make, so every write is one fixed-shape operation."""

    def __init__(self, num_rows: int, width: int, device: torch.device):
        self.tokens = torch.zeros(num_rows + 1, width, dtype=torch.int32, device=device)  # 32 MiB at 1024 x 8K
        self.scratch = num_rows
        self.row_of: dict[Request, int] = {}
        self.written: dict[Request, int] = {}  # tokens of the host's the row holds
        self.free = list(range(num_rows - 1, -1, -1))

    def plan(self, requests: list[Request], previous_rows: list[int]) -> list[np.ndarray]:
        """Host side, for `update`: [rows, host lengths, rows to take the step in flight's tokens (scratch for
        none), their rows in it, whether they have any] and [row, position, token] of each host token a row
        lacks."""
        rows, lengths, slots, positions, values = [], [], [], [], []
        for request in requests:
            row = self.row_of.get(request)
            if row is None:
                row = self.row_of[request] = self._take()
            tokens, done = request.all_token_ids, self.written.get(request, 0)
            if done < len(tokens):
                slots.append(np.full(len(tokens) - done, row))
                positions.append(np.arange(done, len(tokens)))
                values.extend(tokens[done:])
                self.written[request] = len(tokens)
            rows.append(row)
            lengths.append(len(tokens))
        prev = np.array(previous_rows, dtype=np.int64)
        in_flight = prev >= 0
        targets = np.where(in_flight, rows, self.scratch)
        new = [np.concatenate(slots), np.concatenate(positions), np.array(values, dtype=np.int64)] if values \
            else [np.zeros(0, np.int64)] * 3
        return [np.array(rows, np.int64), np.array(lengths, np.int64), targets, np.maximum(prev, 0),
                in_flight.astype(np.int64)] + new

    def update(self, uploaded: list[torch.Tensor], bound: int, previous) -> tuple[torch.Tensor, torch.Tensor]:
        """Device side: write the host's tokens, then the step in flight's after them. Returns (history rows
        [R, L], lengths [R]), L = bound plus the step in flight's width: no length is longer."""
        rows, lengths, targets, prev, in_flight, slots, positions, values = uploaded
        if values.shape[0]:
            self.tokens[slots, positions] = values.to(torch.int32)
        if previous is not None:
            tokens, counts = previous.device_outputs()
            # Every column of the step in flight is written (past its count too: later writes put the truth there).
            columns = lengths.unsqueeze(1) + torch.arange(tokens.shape[1], device=lengths.device)
            self.tokens[targets.unsqueeze(1), columns] = tokens[prev].to(torch.int32)
            lengths = lengths + (in_flight * counts[prev] if counts is not None else in_flight)
            bound += tokens.shape[1]
        return self.tokens[rows, :bound], lengths

    def _take(self) -> int:
        if not self.free:
            self._release(lambda r: r.is_finished)
        if not self.free:
            self._release(lambda r: r.status != RequestStatus.RUNNING)
        return self.free.pop()

    def _release(self, gone: Callable[[Request], bool]) -> None:
        for request in [r for r in self.row_of if gone(r)]:
            self.free.append(self.row_of.pop(request))
            self.written.pop(request, None)


def device_inputs(previous) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The step in flight's last token of each row [R, 1] and, where it verified drafts, how far on each row's
    next token starts from where the host thinks (its accepted count) [R]; (None, None) with nothing in flight."""
    if previous is None:
        return None, None
    tokens, counts = previous.device_outputs()
    if counts is None:
        return tokens, None
    shifts = counts - 1
    return tokens.gather(1, shifts.unsqueeze(1)), shifts


class SpeculativeLoop:
    """Launches the steps with drafts of the overlapped loop (see the module's docstring)."""

    def __init__(self, runner, scheduler, proposer, copies, max_rows: int, max_model_len: int, k_max: int):
        self.runner, self.scheduler, self.proposer, self.copies = runner, scheduler, proposer, copies
        self.pool = scheduler.pool
        # A proposer that drafts from the target's streams (an EAGLE head) catches up from the step in flight's
        # tokens itself; a lookup drafts from token histories kept on the device.
        self.follows = hasattr(proposer, "propose_in_loop")
        self.history = None if self.follows else DeviceHistory(max_rows, max_model_len + 2 * (k_max + 1),
                                                               runner.device)
        self.device = runner.device

    def accepts(self, batch: list[ScheduledRequest]) -> bool:
        """Whether the device can verify this step (sampling/picking.py); a head's chain drafts one depth for all."""
        if not verifiable_on_device(batch):
            return False
        return not self.follows or len({s.num_spec_slots for s in batch if s.num_spec_slots}) == 1

    def launch(self, batch: list[ScheduledRequest], previous,
               item_of: Callable[[ScheduledRequest, int], ForwardItem]) -> DraftStepInFlight:
        """Propose, run and verify a step with drafts without waiting for the host. previous: the step in flight
        (its tokens feed this one's drafts and inputs). item_of(s, device_row): the ForwardItem of a row
        without drafts, whose placeholder (if any) is row device_row of the device tokens."""
        spec = [s for s in batch if s.num_spec_slots]
        sampled = [s for s in batch if s.samples]
        k = max(s.num_spec_slots for s in spec)
        prev_rows = previous.rows if previous is not None else {}
        requests = [s.request for s in spec]
        prev_tokens, prev_shifts = device_inputs(previous)
        if self.follows:
            drafts, num_found = self.proposer.propose_in_loop(spec, previous, self.pool, k)
            uploaded = self._upload(self._last_plan(requests, prev_rows) + self._verify_plan(sampled))
            last, device_shifts = self._last_tokens(prev_tokens, prev_shifts, uploaded[:3])
            verify_plan = uploaded[3:]
        else:
            history_arrays = self.history.plan(requests, [prev_rows.get(r, -1) for r in requests])
            starts = np.fromiter((r.num_computed_tokens for r in requests), np.int64, len(requests))
            uploaded = self._upload(history_arrays + [starts] + self._verify_plan(sampled))
            history, lengths = self.history.update(uploaded[:8], int(history_arrays[1].max()), previous)
            drafts, num_found = self.proposer.propose_on_device(history, lengths, k)
            last = history.gather(1, (lengths - 1).unsqueeze(1)).long()
            device_shifts, verify_plan = lengths - 1 - uploaded[8], uploaded[9:]
        drafts = drafts.long()
        device_tokens = torch.cat([last, drafts], dim=1)
        if prev_tokens is not None:  # rows without drafts take their placeholders from after the spec rows'
            device_tokens = torch.cat([device_tokens, torch.nn.functional.pad(prev_tokens, (0, k))])
            device_shifts = torch.cat([device_shifts, prev_shifts if prev_shifts is not None
                                       else torch.zeros_like(prev_tokens[:, 0])])
        items, spec_row = [], 0
        for s in batch:
            if s.num_spec_slots:
                n = 1 + s.num_spec_slots
                items.append(ForwardItem([0] * n, s.request.num_computed_tokens,
                                         self.pool.block_table(s.request.request_id), n, spec_row, n))
                spec_row += 1
            else:
                prev = prev_rows.get(s.request, -1)
                items.append(item_of(s, len(spec) + prev if prev >= 0 else -1))
        logits = self.runner.forward(items, device_tokens=device_tokens, device_shifts=device_shifts)
        if self.follows:  # every request's rows, as Speculator.observe_forward
            self.proposer.observe_forward(batch, items, *self.runner.aux_hidden_states(items))
        self.scheduler.advance(batch)
        if self.pool.enable_prefix_caching:
            self.pool.cache_filled_blocks([s.request for s in batch])
        tokens, counts, host = self._verify(logits, verify_plan, drafts, num_found, k)
        outputs = [s.request for s in sampled]
        self.scheduler.add_placeholders(outputs)
        for s in spec:
            s.request.num_drafts_in_flight = s.num_spec_slots
        step = DraftStepInFlight(outputs, {r: i for i, r in enumerate(outputs)}, tokens, counts,
                                 [s.num_spec_slots for s in sampled], *self.copies.start(host))
        if self.follows:
            self.proposer.launched(step)
        return step

    @staticmethod
    def _last_plan(requests: list[Request], prev_rows: dict[Request, int]) -> list[np.ndarray]:
        """For _last_tokens: each request's row in the step in flight (-1: none), and its last token where the
        host knows it (0 where that step holds it)."""
        rows = np.fromiter((prev_rows.get(r, -1) for r in requests), np.int64, len(requests))
        known = np.fromiter((r.all_token_ids[-1] if row < 0 else 0 for r, row in zip(requests, rows.tolist())),
                            np.int64, len(requests))
        return [rows, known, (rows >= 0).astype(np.int64)]

    @staticmethod
    def _last_tokens(prev_tokens: torch.Tensor | None, prev_shifts: torch.Tensor | None, plan: list[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each request's last token [R, 1] and how far on its next one starts from where the host thinks [R]:
        the step in flight's last (and its accepted drafts: device_inputs) where it holds the request, else the
        host's."""
        rows, known, in_flight = plan
        if prev_tokens is None:
            return known.unsqueeze(1), torch.zeros_like(known)
        at = rows.clamp(min=0)
        last = torch.where(in_flight.bool(), prev_tokens[at, 0].long(), known)
        shift = in_flight * prev_shifts[at] if prev_shifts is not None else torch.zeros_like(known)
        return last.unsqueeze(1), shift

    def _upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """The step's host-made int arrays on the device, in one copy."""
        sizes = [len(a) for a in arrays]
        return list(to_device(np.concatenate(arrays), torch.long, self.device).split(sizes))

    @staticmethod
    def _verify_plan(sampled: list[ScheduledRequest]) -> list[np.ndarray]:
        """For _verify: each sampled row's first logits row, its draft slots, and the sampled rows that draft."""
        num_spec = np.fromiter((s.num_spec_slots for s in sampled), np.int64, len(sampled))
        first = np.concatenate(([0], np.cumsum(num_spec + 1)[:-1]))
        return [first, num_spec, np.flatnonzero(num_spec)]

    def _verify(self, logits: torch.Tensor, plan: list[torch.Tensor], drafts: torch.Tensor, num_found: torch.Tensor,
                k: int):
        """Greedy verification on the device: row i's drafts stand while they equal the target's argmax, the
        argmax after the last one is its next token. Returns (tokens [R, k + 1], counts [R], what the host
        reads [R, k + 3])."""
        first, num_spec, spec_index = plan
        positions = torch.arange(k + 1, device=self.device)
        picks = logits.argmax(dim=-1)[first.unsqueeze(1) + torch.minimum(positions, num_spec.unsqueeze(1))]
        if spec_index.shape[0] == first.shape[0]:  # every sampled row drafts (most steps)
            verified, num_drafts = drafts, torch.minimum(num_found, num_spec)
        else:
            verified = drafts.new_zeros(first.shape[0], k).index_copy_(0, spec_index, drafts)
            num_drafts = torch.minimum(num_found.new_zeros(first.shape[0]).index_copy_(0, spec_index, num_found),
                                       num_spec)
        agree = (verified == picks[:, :k]) & (positions[:k].unsqueeze(0) < num_drafts.unsqueeze(1))
        num_accepted = agree.long().cumprod(dim=1).sum(dim=1)
        following = picks.gather(1, num_accepted.unsqueeze(1))
        tokens = torch.cat([verified, following], dim=1).scatter(1, num_accepted.unsqueeze(1), following)
        host = torch.cat([verified, following, num_accepted.unsqueeze(1), num_drafts.unsqueeze(1)], dim=1)
        return tokens, num_accepted + 1, host
