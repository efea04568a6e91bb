"""Scheduler: one token budget per step, running before waiting, chunked prefill, preemption, priority."""

import time
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.core.kv_cache import BlockPool
from scheduler.core.params import SamplingParams
from scheduler.core.request import Request, RequestStatus
from scheduler.core.scheduler import Scheduler, SchedulerOutput

FIRST_FAKE_TOKEN = 1000


def fake_token(request: Request) -> int:
    """The n-th sampled token of any request is FIRST_FAKE_TOKEN + n: outputs are checkable, and
    equal prompts grow equal sequences, which the prefix cache then shares."""
    return FIRST_FAKE_TOKEN + request.num_output_tokens


class Sim:
    """Plays Engine._run against a real Scheduler and BlockPool. Keeps a model of the KV cache in which
    every slot remembers the token prefix computed into it, so a request that attends to a slot holding
    anything but its own prefix fails the test."""

    def __init__(self, num_blocks: int, block_size: int = 4, max_num_batched_tokens: int = 64,
                 max_num_seqs: int = 8, priority_aging_s: float = 0.0, enable_prefix_caching: bool = True):
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.sched = Scheduler(self.pool, max_num_batched_tokens, max_num_seqs, priority_aging_s)
        self.kv: dict[tuple[int, int], tuple[int, ...]] = {}
        self.requests: list[Request] = []
        self.num_steps = 0
        self.first_scheduled: list[str] = []
        self.samples: dict[str, bool] = {}  # last step: request id -> whether it sampled

    def add(self, request_id: str, prompt: list[int], max_tokens: int, priority: int = 0,
            age_s: float = 0.0) -> Request:
        request = Request(request_id, list(prompt), SamplingParams(max_tokens=max_tokens), priority=priority,
                          arrival_time=time.monotonic() - age_s)
        self.sched.add(request)
        self.requests.append(request)
        return request

    def step(self) -> SchedulerOutput:
        had_work = self.sched.num_unfinished > 0
        out = self.sched.schedule()
        self.num_steps += 1
        self._check(out, had_work)
        samples = [s.samples for s in out.scheduled]  # read before computing: it depends on num_computed_tokens
        self.samples = {s.request.request_id: sample for s, sample in zip(out.scheduled, samples)}
        for s in out.scheduled:
            if s.request.request_id not in self.first_scheduled:
                self.first_scheduled.append(s.request.request_id)
            self._compute(s.request, s.num_new_tokens)
        for s, sample in zip(out.scheduled, samples):
            if sample:
                s.request.append_token(fake_token(s.request))
                if s.request.num_output_tokens == s.request.params.max_tokens:
                    self.sched.finish(s.request)
        assert_pool_consistent(self.pool)
        return out

    def run(self, max_steps: int) -> None:
        while self.sched.num_unfinished:
            assert self.num_steps < max_steps, f"not done after {max_steps} steps"
            self.step()

    def _check(self, out: SchedulerOutput, had_work: bool) -> None:
        assert out.num_batched_tokens <= self.sched.max_num_batched_tokens
        assert len(out.scheduled) <= self.sched.max_num_seqs
        assert len(self.sched.running) <= self.sched.max_num_seqs
        scheduled = [s.request for s in out.scheduled]
        assert len(set(map(id, scheduled))) == len(scheduled)
        assert not set(map(id, scheduled)) & set(map(id, out.preempted))
        assert not had_work or out.scheduled, "a step with work pending scheduled nothing"
        for s in out.scheduled:
            assert s.num_new_tokens >= 1
            assert s.request.status == RequestStatus.RUNNING
            assert s.request.num_computed_tokens + s.num_new_tokens <= s.request.num_tokens
        for request in out.preempted:
            assert request.status == RequestStatus.WAITING
            assert request.num_computed_tokens == 0
            assert self.pool.block_table(request.request_id) == []
            assert request in self.sched.waiting

    def _compute(self, request: Request, num_new_tokens: int) -> None:
        block_size, table = self.pool.block_size, self.pool.block_table(request.request_id)
        start, end = request.num_computed_tokens, request.num_computed_tokens + num_new_tokens
        assert len(table) * block_size >= end
        for pos in range(start):
            assert self.kv[table[pos // block_size], pos % block_size] == tuple(request.all_token_ids[:pos + 1]), \
                f"{request.request_id} reads a KV slot that is not its own prefix at position {pos}"
        for pos in range(start, end):
            assert self.pool.blocks[table[pos // block_size]].ref_cnt == 1, "writing into a shared block"
            self.kv[table[pos // block_size], pos % block_size] = tuple(request.all_token_ids[:pos + 1])
        request.num_computed_tokens = end
        self.pool.cache_full_blocks(request, end)


def assert_pool_consistent(pool: BlockPool) -> None:
    holders = Counter(b.block_id for blocks in pool.req_blocks.values() for b in blocks)
    assert [b.ref_cnt for b in pool.blocks] == [holders[i] for i in range(pool.num_blocks)]
    assert set(pool.free_blocks) == {b.block_id for b in pool.blocks if b.ref_cnt == 0}


def assert_all_done(sim: Sim) -> None:
    for request in sim.requests:
        assert request.is_finished
        assert request.output_token_ids == [FIRST_FAKE_TOKEN + i for i in range(request.params.max_tokens)]
    assert sim.pool.num_free_blocks == sim.pool.num_blocks
    assert all(b.ref_cnt == 0 for b in sim.pool.blocks)
    assert sim.sched.running == sim.sched.waiting == []


def scheduled_tokens(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]


def test_a_step_stays_within_the_token_budget_and_the_seat_limit():
    sim = Sim(num_blocks=32, max_num_batched_tokens=8, max_num_seqs=3)
    for i in range(5):
        sim.add(f"r{i}", [i] * 6, max_tokens=3, age_s=10 - i)
    assert scheduled_tokens(sim.step()) == [("r0", 6), ("r1", 2)]
    assert scheduled_tokens(sim.step()) == [("r0", 1), ("r1", 4), ("r2", 3)]
    assert scheduled_tokens(sim.step()) == [("r0", 1), ("r1", 1), ("r2", 3)]  # 3 seats taken: r3 waits
    assert [r.request_id for r in sim.sched.waiting] == ["r3", "r4"]
    sim.run(max_steps=50)
    assert_all_done(sim)


def test_running_requests_are_scheduled_before_waiting_ones():
    sim = Sim(num_blocks=32, max_num_batched_tokens=8)
    a = sim.add("a", [1, 2, 3, 4], max_tokens=10, priority=5)
    assert scheduled_tokens(sim.step()) == [("a", 4)]
    sim.add("b", list(range(20)), max_tokens=2, priority=-5)  # ranks higher, but a is already running
    assert scheduled_tokens(sim.step()) == [("a", 1), ("b", 7)]
    assert a.num_output_tokens == 2
    sim.run(max_steps=50)
    assert_all_done(sim)


def test_a_long_prompt_is_prefilled_in_chunks_and_samples_only_after_the_last():
    sim = Sim(num_blocks=32, max_num_batched_tokens=8)
    request = sim.add("a", list(range(20)), max_tokens=3)
    chunks, samples, blocks = [], [], []
    while not request.is_finished:
        (s,) = sim.step().scheduled
        chunks.append(s.num_new_tokens)
        samples.append(sim.samples["a"])
        blocks.append(len(sim.pool.block_table("a")))  # 0 once finished
    assert chunks == [8, 8, 4, 1, 1]
    assert samples == [False, False, True, True, True]
    assert blocks[:4] == [2, 4, 5, 6]  # blocks are taken chunk by chunk, not for the whole prompt at once
    assert_all_done(sim)


@pytest.mark.parametrize("priority_a, priority_b, victim_id", [
    (0, 0, "b"),  # equal priority: the later arrival goes
    (1, 0, "a"),  # the lower priority goes, though it came first
])
def test_running_out_of_blocks_preempts_the_lowest_ranked_request_which_later_completes(
        priority_a, priority_b, victim_id):
    sim = Sim(num_blocks=4, block_size=4)  # 16 token slots; two 7-token prompts take all 4 blocks
    sim.add("a", [1] * 7, max_tokens=6, priority=priority_a, age_s=2)
    sim.add("b", [2] * 7, max_tokens=6, priority=priority_b, age_s=1)
    victim = next(r for r in sim.requests if r.request_id == victim_id)
    survivor = next(r for r in sim.requests if r is not victim)
    sim.step()
    sim.step()
    assert sim.pool.num_free_blocks == 0 and victim.num_tokens == 9  # the next decode needs a third block

    out = sim.step()
    assert out.preempted == [victim]
    assert scheduled_tokens(out) == [(survivor.request_id, 1)]
    assert victim.num_preemptions == 1
    assert victim.status == RequestStatus.WAITING
    assert victim.num_computed_tokens == 0
    assert sim.pool.block_table(victim_id) == []
    assert victim.output_token_ids == [FIRST_FAKE_TOKEN, FIRST_FAKE_TOKEN + 1]  # kept, to be recomputed
    assert len(sim.pool.block_table(survivor.request_id)) == 3

    sim.run(max_steps=50)
    assert victim.num_preemptions == 1 and survivor.num_preemptions == 0
    assert_all_done(sim)


def test_a_request_that_cannot_grow_and_ranks_lowest_preempts_itself():
    sim = Sim(num_blocks=5, block_size=4)
    a = sim.add("a", [1] * 7, max_tokens=6, age_s=2)
    b = sim.add("b", [2] * 7, max_tokens=6, age_s=1)
    sim.step()
    sim.step()
    assert sim.pool.num_free_blocks == 1  # enough for one of them to grow, not both

    out = sim.step()
    assert scheduled_tokens(out) == [("a", 1)]
    assert out.preempted == [b]
    assert len(sim.pool.block_table("a")) == 3
    sim.run(max_steps=50)
    assert (a.num_preemptions, b.num_preemptions) == (0, 1)
    assert_all_done(sim)


def test_a_resumed_request_recomputes_prompt_and_outputs_before_sampling_again():
    sim = Sim(num_blocks=4, block_size=4, max_num_batched_tokens=6, enable_prefix_caching=False)
    sim.add("a", [1] * 7, max_tokens=8, age_s=2)
    b = sim.add("b", [2] * 7, max_tokens=8, age_s=1)
    while not b.num_preemptions:
        sim.step()
    num_known, num_outputs = b.num_tokens, b.num_output_tokens
    assert num_outputs >= 1
    computed_and_samples = []
    while b.num_output_tokens == num_outputs:
        sim.step()
        if "b" in sim.samples:
            computed_and_samples.append((b.num_computed_tokens, sim.samples["b"]))
    assert len(computed_and_samples) >= 2  # a 6-token budget: the recompute takes more than one chunk
    assert computed_and_samples[-1] == (num_known, True)
    assert not any(sample for _, sample in computed_and_samples[:-1])
    sim.run(max_steps=100)
    assert_all_done(sim)


class Reader:
    """What the scheduler reads of a request's output stream: whether its reader is far behind."""
    paused = False


def test_a_paused_request_is_not_scheduled_and_is_the_first_to_give_its_blocks_up():
    sim = Sim(num_blocks=4, block_size=4)
    slow = sim.add("slow", [1] * 7, max_tokens=6, age_s=2)  # ranks first while it runs
    slow.stream = reader = Reader()
    sim.step()
    reader.paused = True
    busy = sim.add("busy", [2] * 7, max_tokens=6)
    assert scheduled_tokens(sim.step()) == [("busy", 7)]  # not slow
    assert scheduled_tokens(sim.step()) == [("busy", 1)]
    assert sim.pool.num_free_blocks == 0 and busy.num_tokens == 9  # busy's next decode needs a third block
    out = sim.step()
    assert out.preempted == [slow] and scheduled_tokens(out) == [("busy", 1)]
    reader.paused = False
    sim.run(max_steps=50)
    assert (slow.num_preemptions, busy.num_preemptions) == (1, 0)
    assert_all_done(sim)


def test_a_paused_request_gives_its_blocks_up_to_one_waiting_for_them():
    sim = Sim(num_blocks=4, block_size=4, enable_prefix_caching=False)
    slow = sim.add("slow", [1] * 11, max_tokens=4)
    slow.stream = reader = Reader()
    sim.step()
    reader.paused = True
    assert sim.pool.num_free_blocks == 1
    sim.add("new", [2] * 7, max_tokens=4)  # two blocks
    out = sim.step()
    assert out.preempted == [slow] and scheduled_tokens(out) == [("new", 7)]
    reader.paused = False
    sim.run(max_steps=50)
    assert_all_done(sim)


def test_priority_lower_value_goes_first_and_arrival_order_breaks_ties():
    sim = Sim(num_blocks=32, max_num_seqs=1)
    for request_id, priority, age_s in [("c", 1, 4), ("a1", 0, 2), ("d", 1, 3), ("a2", 0, 1), ("b", 0, 0)]:
        sim.add(request_id, [7, 7, 7], max_tokens=2, priority=priority, age_s=age_s)
    sim.run(max_steps=50)
    assert sim.first_scheduled == ["a1", "a2", "b", "c", "d"]
    assert_all_done(sim)


@pytest.mark.parametrize("priority_aging_s, expected_first", [
    (0.0, "high1"),  # aging off: priority alone decides
    (100.0, "high1"),  # a minute of waiting is less than one priority step
    (1.0, "old_low"),  # 60 s of waiting outweighs a priority gap of 3
])
def test_aging_lets_an_old_low_priority_request_overtake_new_high_priority_ones(priority_aging_s, expected_first):
    sim = Sim(num_blocks=32, max_num_seqs=1, priority_aging_s=priority_aging_s)
    sim.add("old_low", [1, 2, 3], max_tokens=1, priority=3, age_s=60)
    sim.add("high1", [1, 2, 3], max_tokens=1, priority=0)
    sim.add("high2", [1, 2, 3], max_tokens=1, priority=0)
    sim.run(max_steps=10)
    assert sim.first_scheduled[0] == expected_first
    assert sim.first_scheduled.index("high1") < sim.first_scheduled.index("high2")
    assert_all_done(sim)


@st.composite
def workloads(draw):
    """A small pool and requests with random prompt and output lengths, priorities, ages and arrival steps.
    Prompts start from few shared stems so that prefix caching, eviction and sharing all happen."""
    block_size = draw(st.sampled_from([1, 2, 4]))
    num_blocks = draw(st.integers(2, 10))
    capacity = num_blocks * block_size
    config = dict(num_blocks=num_blocks, block_size=block_size,
                  max_num_batched_tokens=draw(st.integers(1, 24)), max_num_seqs=draw(st.integers(1, 5)),
                  priority_aging_s=draw(st.sampled_from([0.0, 0.5, 10.0])),
                  enable_prefix_caching=draw(st.booleans()))
    stems = draw(st.lists(st.lists(st.integers(0, 2), min_size=capacity, max_size=capacity), min_size=1, max_size=3))
    requests = []
    for _ in range(draw(st.integers(1, 10))):
        num_prompt = draw(st.integers(1, capacity - 1))
        num_shared = draw(st.integers(0, num_prompt) | st.just(num_prompt))
        prompt = draw(st.sampled_from(stems))[:num_shared] + draw(
            st.lists(st.integers(0, 2), min_size=num_prompt - num_shared, max_size=num_prompt - num_shared))
        # The last sampled token is never computed, so prompt + max_tokens may exceed the capacity by one.
        max_tokens = draw(st.integers(1, capacity + 1 - num_prompt))
        requests.append(dict(prompt=prompt, max_tokens=max_tokens, priority=draw(st.integers(0, 2)),
                             age_s=draw(st.floats(0, 30)), arrival_step=draw(st.integers(0, 15))))
    return config, requests


@settings(max_examples=200, deadline=None, derandomize=True)
@given(workloads())
def test_random_workloads_on_a_small_pool_all_complete_in_bounded_steps(workload):
    config, requests = workload
    sim = Sim(**config)
    pending = sorted(enumerate(requests), key=lambda item: item[1]["arrival_step"])
    total_tokens = sum(len(r["prompt"]) + r["max_tokens"] for r in requests)
    # Up to 15 steps waiting for arrivals, then at least one token a step; preemption recomputes some.
    max_steps = 16 + 4 * total_tokens
    while pending or sim.sched.num_unfinished:
        while pending and pending[0][1]["arrival_step"] <= sim.num_steps:
            i, r = pending.pop(0)
            sim.add(f"r{i}", r["prompt"], r["max_tokens"], r["priority"], r["age_s"])
        assert sim.num_steps < max_steps, f"not done after {max_steps} steps"
        sim.step()
    assert len(sim.requests) == len(requests)
    assert_all_done(sim)
