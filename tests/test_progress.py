"""Request progress in arrays (scheduler/core/progress.py): the scheduler's pass over its running requests by array
operations schedules what the row-by-row pass would, the arrays agree with the requests after every step, and an
ended request's slot is reused only after the step that may still carry it is applied."""

from __future__ import annotations

import dataclasses
import functools
import gc
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import Engine
from scheduler.core.kv_cache import BlockPool
from scheduler.core.outputs import RequestOutput, token_output
from scheduler.core.params import SamplingParams
from scheduler.core.progress import PENDING_TOKENS, Progress
from scheduler.core.request import Request
from scheduler.core.scheduler import Scheduler, SchedulerOutput, StepOutput, _order
from scheduler.core.step_output import apply_rows, apply_tokens
from scheduler.sampling.batch import SamplingBatch
from scheduler.sampling.rows import plain_rows, sampling_rows
from tests.test_scheduler import Sim, assert_all_done, workloads


class RowByRow(Scheduler):
    """The scheduler without its array pass: every step goes one row at a time."""

    def _schedule_running(self, out: SchedulerOutput, spec_depth: int) -> int:
        sorted_now = self._unsorted and bool(self.running)
        if sorted_now:
            self.running.sort(key=_order)
        return self._schedule_one_by_one(out, spec_depth, sorted_now)


def _rows(out: SchedulerOutput) -> list[tuple]:
    return [(s.request.request_id, s.num_new_tokens, s.num_spec_slots, s.samples) for s in out.scheduled]


def _assert_progress_follows_requests(scheduler: Scheduler) -> None:
    progress, pool = scheduler.progress, scheduler.pool
    for request in scheduler.running + scheduler.waiting:
        slot = request._slot
        assert progress.tokens[slot] == len(request.all_token_ids)
        assert progress.capacity[slot] == len(pool.req_block_ids.get(request.request_id, ())) * pool.block_size
        assert progress.max_total[slot] == request.max_total_tokens and not progress.finished[slot]


def _lockstep(config: dict, requests: list[dict], max_steps: int, spec_depth: int = 0) -> int:
    """Run the workload on the scheduler and on RowByRow side by side; every step schedules and preempts the same
    (with spec_depth, draft slots too: every third request may not speculate, every other one caps its depth at 1).
    Returns the steps the array pass took."""
    sim, ref = Sim(**config), Sim(**config)
    ref.sched = RowByRow(ref.pool, ref.sched.max_num_batched_tokens, ref.sched.max_num_seqs,
                         ref.sched.priority_aging_s)
    for s in (sim, ref):
        s.sched.schedule = functools.partial(s.sched.schedule, spec_depth)
    pending = sorted(enumerate(requests), key=lambda item: item[1]["arrival_step"])
    by_arrays = 0
    while pending or sim.sched.num_unfinished:
        while pending and pending[0][1]["arrival_step"] <= sim.num_steps:
            i, r = pending.pop(0)
            for s in (sim, ref):  # the same arrival time in both: the same rank
                request = Request(f"r{i}", list(r["prompt"]), SamplingParams(max_tokens=r["max_tokens"]),
                                  priority=r["priority"], arrival_time=i - r["age_s"], speculative=i % 3 != 2,
                                  max_draft_tokens=1 if i % 2 else None)
                request.max_total_tokens = len(r["prompt"]) + r["max_tokens"]
                s.sched.add(request)
                s.requests.append(request)
        assert sim.num_steps < max_steps
        out, expected = sim.step(), ref.step()
        by_arrays += sim.sched._by_rank
        assert _rows(out) == _rows(expected)
        assert [r.request_id for r in out.preempted] == [r.request_id for r in expected.preempted]
        _assert_progress_follows_requests(sim.sched)
    assert_all_done(sim)
    return by_arrays


@settings(max_examples=100, deadline=None, derandomize=True)
@given(workloads(), st.integers(0, 2))
def test_the_array_pass_schedules_what_the_row_by_row_pass_would(workload, spec_depth):
    config, requests = workload
    _lockstep(config, requests, 16 + 4 * sum(len(r["prompt"]) + r["max_tokens"] for r in requests), spec_depth)


@pytest.mark.parametrize("spec_depth", [0, 3])
def test_steady_decoding_takes_the_array_pass_and_still_matches(spec_depth):
    """A roomy pool: after the prompts, every step goes by arrays (prefill chunks, block crossings, draft slots,
    requests that end) and schedules what the row-by-row pass does."""
    config = dict(num_blocks=64, block_size=4, max_num_batched_tokens=24, max_num_seqs=8)
    requests = [dict(prompt=[i % 3, 1, 2] * (1 + i), max_tokens=5 + 3 * i, priority=i % 2, age_s=0.0,
                     arrival_step=i) for i in range(6)]
    assert _lockstep(config, requests, 200, spec_depth) > 20


def test_an_ended_requests_slot_waits_for_the_step_that_carries_it():
    """A request aborted while its step is in flight keeps its slot until that step is applied: the request admitted
    meanwhile takes another, and the step's token reaches neither."""
    scheduler = Scheduler(BlockPool(16, 4), max_num_batched_tokens=32, max_num_seqs=4)
    first = Request("a", [1, 2, 3], SamplingParams(max_tokens=4))
    scheduler.add(first)
    batch = scheduler.schedule().scheduled
    scheduler.advance(batch)
    scheduler.add_placeholders([first])  # launched: its token is on the device
    scheduler.finish(first)  # aborted
    second = Request("b", [4, 5], SamplingParams(max_tokens=4))
    scheduler.add(second)
    assert second._slot != first._slot
    scheduler.update_from_output(StepOutput([first], [9], in_flight=True))
    assert first.output_token_ids == [] and second.output_token_ids == [] and first.num_placeholders == 0
    third = Request("c", [6], SamplingParams(max_tokens=4))
    scheduler.add(third)
    assert third._slot == first._slot  # free once the step that carried it is applied
    _assert_progress_follows_requests(scheduler)


def test_tokens_applied_by_arrays_are_those_applied_row_by_row():
    """The one place a step's tokens reach their requests takes the same path in effect either way: by array
    operations (one token a row) or row by row (as with drafts or logprobs)."""
    schedulers = [Scheduler(BlockPool(16, 4), 64, 8) for _ in range(2)]
    rows = []
    for scheduler in schedulers:
        requests = [Request(f"r{i}", [i + 1] * (i + 2), SamplingParams(max_tokens=8)) for i in range(4)]
        for request in requests:
            scheduler.add(request)
        scheduler.add_placeholders(requests)
        scheduler.finish(requests[2])  # ended while its token was in flight: it takes none
        rows.append(requests)
    tokens = [11, 12, 13, 14]
    by_arrays = apply_tokens(schedulers[0].progress, StepOutput(rows[0], tokens, in_flight=True))
    by_rows = apply_rows(StepOutput(rows[1], tokens, in_flight=True))
    assert [(r.request.request_id, r.new_token_ids) for r in by_arrays] == \
        [(r.request.request_id, r.new_token_ids) for r in by_rows] == [("r0", [11]), ("r1", [12]), ("r3", [14])]
    for a, b in zip(*rows):
        assert (a.all_token_ids, a.output_token_ids, a.num_placeholders) == \
            (b.all_token_ids, b.output_token_ids, b.num_placeholders)
    _assert_progress_follows_requests(schedulers[0])
    _assert_progress_follows_requests(schedulers[1])


def test_tokens_held_in_the_arrays_reach_the_request_whenever_it_is_read():
    """A step's tokens wait in the request's slot (PENDING_TOKENS at most) until its token list is read, at any
    point, or it ends; the list then holds every token in order."""
    scheduler = Scheduler(BlockPool(64, 4), 64, 8)
    requests = [Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=200)) for i in range(3)]
    for request in requests:
        scheduler.add(request)
    expected = [[1, 2, 3] for _ in requests]
    for step in range(3 * PENDING_TOKENS + 5):
        tokens = [(step * 7 + i) % 50 for i in range(3)]
        scheduler.add_placeholders(requests)
        scheduler.update_from_output(StepOutput(requests, tokens, in_flight=True))
        for tokens_so_far, token in zip(expected, tokens):
            tokens_so_far.append(token)
        if step % 13 == 0:  # one request read now and then, the others not
            assert requests[0].all_token_ids == expected[0]
        assert [r.num_output_tokens for r in requests] == [step + 1] * 3
    scheduler.finish(requests[1])  # read after it ended: its held tokens went with it
    assert [r.all_token_ids for r in requests] == expected
    assert requests[2].output_token_ids == expected[2][3:]
    _assert_progress_follows_requests(scheduler)


def test_a_tokens_only_output_is_the_output_with_the_rest_at_defaults():
    built = token_output("req-1", [7, 8], 5, 2, 4, 1)
    assert built == RequestOutput("req-1", [7, 8], "", num_prompt_tokens=5, num_output_tokens=2, num_cached_tokens=4,
                                  index=1)
    assert not built.finished and built.logprobs is None and built.held_back_bytes == 0


def test_sampling_rows_read_from_the_arrays_are_those_read_from_the_requests():
    """A step's sampling rows built from the progress arrays equal those built request by request; a request whose
    sampling reads more than its parameters (a penalty, logit bias, min_tokens) has them built the long way."""
    scheduler = Scheduler(BlockPool(64, 4), 64, 8)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=5, top_p=0.9),
              SamplingParams(temperature=1.3, min_p=0.1, logprobs=2, seed=3), SamplingParams(top_k=1000)]
    requests = [Request(f"r{i}", [1, 2], p) for i, p in enumerate(params)]
    requests[2].generator = torch.Generator().manual_seed(3)
    for request in requests:
        scheduler.add(request)
    slots, cpu = scheduler.progress.slots_of(requests), torch.device("cpu")
    fast, slow = plain_rows(scheduler.progress, slots, requests, 256, cpu), sampling_rows(requests, 256, cpu)
    for field in dataclasses.fields(SamplingBatch):
        a, b = getattr(fast, field.name), getattr(slow, field.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, field.name
    penalised = Request("p", [1, 2], SamplingParams(presence_penalty=0.5))
    scheduler.add(penalised)
    assert plain_rows(scheduler.progress, scheduler.progress.slots_of([penalised]), [penalised], 256, cpu) is None


def test_the_arrays_grow_and_keep_what_they_hold():
    progress = Progress(num_slots=2)
    requests = [Request(f"r{i}", [1] * (i + 1), SamplingParams(temperature=0.5 + i)) for i in range(5)]
    for i, request in enumerate(requests):
        progress.join(request)
        request.num_computed_tokens = i
    assert progress.num_slots >= 5 and len({r._slot for r in requests}) == 5
    assert [r.num_computed_tokens for r in requests] == list(range(5))
    assert [r.num_tokens for r in requests] == [int(progress.tokens[r._slot]) for r in requests] == [1, 2, 3, 4, 5]
    assert progress.temperature[requests[4]._slot] == 4.5


def test_an_ended_request_is_freed_without_the_garbage_collector(tiny_model_dir):
    """The engine's handle on a request (its Live, kept in the request's slot) is let go when the request ends:
    no cycle is left for the collector, which the engine keeps off the step loop."""
    engine = Engine(model=str(tiny_model_dir[0]))
    engine.add_request(None, SamplingParams(temperature=0, max_tokens=5), prompt_token_ids=[1, 2, 3])
    live = engine._pending_add[0][0]
    request_ref, live_ref = weakref.ref(live.request), weakref.ref(live)
    del live
    gc.disable()
    try:
        while engine.has_unfinished():
            engine.step()
        engine._in_flight = None  # the last launched step (already collected) holds its requests
        assert request_ref() is None and live_ref() is None
    finally:
        gc.enable()
