"""The daemon under load and faults, over real sockets: hundreds of concurrent streams, clients that
cancel, time out or vanish, KV exhaustion, a full queue and a failing engine. Whatever happens, every
call ends with its whole answer (equal to the offline engine's greedy output) or an explicit status,
memory stays bounded, and the block pool returns to its baseline (invariants 1, 3 and 4)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scheduler import LLM, SamplingParams
from server.proto.beastserve.v1 import generate_pb2 as pb
from server.proto.beastserve.v1 import generate_pb2_grpc as pb_grpc
from tests.conftest import save_tiny_model, tiny_config
from tests.daemon import ROOT, Daemon
from tests.test_server import sample, scrape, wait_pool_idle

VOCAB = 512
MAX_MODEL_LEN = 4096  # long enough that one request holds the engine for seconds, until the test aborts it
HOLD = MAX_MODEL_LEN - 64  # max_tokens of such a request (prompts stay under 64 tokens)
TIMEOUT = 60  # client-side guard on every call: a hang fails as DEADLINE_EXCEEDED
BLOCK_BYTES = 2 * 2 * 2 * 16 * 4 * 16  # layers x (k, v) x kv heads x head dim x fp32 x tokens, for tiny_config()
MAIN_KV_BLOCKS = 576  # 256 running short requests never fill it; 40 long ones want ~700 blocks
MAX_QUEUE = 8
FAULT_AFTER_STEPS = 300  # the warm-up takes one step; the fault hits while the test's streams are mid-way
READINESS = "beastserve.v1.Generation"

FLEET = {
    "main": (("--max-num-seqs", "256", "--kv-cache-bytes", str(MAIN_KV_BLOCKS * BLOCK_BYTES)), {}),
    "queued": (("--max-num-seqs", "1", "--max-queue-size", str(MAX_QUEUE), "--kv-cache-bytes", str(8 << 20)), {}),
    "faulty": (("--kv-cache-bytes", str(8 << 20)), {"BEASTSERVE_TEST_FAULT_AFTER_STEPS": str(FAULT_AFTER_STEPS)}),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-4k")
    save_tiny_model(path, tiny_config(max_position_embeddings=MAX_MODEL_LEN))
    return path


@pytest.fixture(scope="module")
def fleet(model_dir, tmp_path_factory):
    """Every daemon of this module, launched together so their start-ups overlap."""
    logs = tmp_path_factory.mktemp("logs")
    daemons = {name: Daemon(model_dir, *flags, log_path=logs / f"{name}.log", env=env)
               for name, (flags, env) in FLEET.items()}
    yield daemons
    codes = {name: d.close(timeout=30) for name, d in daemons.items()}
    assert all(code == 0 for name, code in codes.items() if name != "faulty"), codes


@pytest.fixture(scope="module")
def offline(model_dir):
    return LLM(str(model_dir), kv_cache_bytes=8 << 20)


def ready(fleet, name: str) -> Daemon:
    return fleet[name].wait_ready()


@pytest.fixture
def main(fleet):
    daemon = ready(fleet, "main")
    with daemon.channel() as channel:
        yield daemon, pb_grpc.GenerationStub(channel)


@pytest.fixture
def queued(fleet):
    daemon = ready(fleet, "queued")
    with daemon.channel() as channel:
        yield daemon, pb_grpc.GenerationStub(channel)


def greedy(prompt: list[int], max_tokens: int, request_id: str = "", logprobs: int = 0) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=request_id, token_ids=pb.TokenIds(ids=prompt),
                              sampling=pb.SamplingParams(temperature=0),
                              stopping=pb.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True),
                              output=pb.OutputOptions(logprobs=logprobs))


def random_prompts(rng: random.Random, n: int, lengths: tuple[int, int]) -> list[list[int]]:
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(*lengths))] for _ in range(n)]


def offline_greedy(offline: LLM, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    return [o.token_ids for o in offline.generate(prompts, params)]


def rss_bytes(daemon: Daemon) -> int:
    with open(f"/proc/{daemon.proc.pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


@dataclass
class Outcome:
    """How one call ended: the tokens it received, its status, and its last message (streams: the final one)."""

    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    tokens: list[int] = field(default_factory=list)
    chunks: list[pb.GenerateResponse] = field(default_factory=list)

    @property
    def last(self) -> pb.GenerateResponse | None:
        return self.chunks[-1] if self.chunks else None

    @property
    def complete(self) -> bool:
        """OK, only the last message carries a finish reason, and usage counts every token received."""
        return (self.code == grpc.StatusCode.OK and self.last.finish_reason != pb.FINISH_REASON_UNSPECIFIED
                and all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in self.chunks[:-1])
                and self.last.usage.completion_tokens == len(self.tokens))


async def read_stream(call, outcome: Outcome | None = None, stop_after: int | None = None) -> Outcome:
    """Read a GenerateStream call to its end (or cancel it after stop_after messages)."""
    outcome = outcome or Outcome()
    try:
        async for chunk in call:
            outcome.chunks.append(chunk)
            outcome.tokens += chunk.token_ids
            if stop_after is not None and len(outcome.chunks) >= stop_after:
                call.cancel()
                break
    except grpc.aio.AioRpcError:
        pass
    except asyncio.CancelledError:  # cancelled by the test while waiting for a message
        pass
    outcome.code, outcome.details = await call.code(), await call.details()
    return outcome


async def unary(stub, request, timeout: float = TIMEOUT) -> Outcome:
    try:
        response = await stub.Generate(request, timeout=timeout)
    except grpc.aio.AioRpcError as err:
        return Outcome(err.code(), err.details())
    return Outcome(tokens=list(response.token_ids), chunks=[response])


def aio_stubs(daemon: Daemon, n: int = 1) -> tuple[list[grpc.aio.Channel], list[pb_grpc.GenerationStub]]:
    # A local subchannel pool gives each channel its own connection.
    channels = [grpc.aio.insecure_channel(daemon.address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(n)]
    return channels, [pb_grpc.GenerationStub(c) for c in channels]


async def close_all(channels) -> None:
    await asyncio.gather(*(c.close() for c in channels))


def wait_for(predicate, timeout: float, what: str, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, what
        time.sleep(interval)
    return value


# --- load ---

async def burst(daemon: Daemon, requests: list[pb.GenerateRequest]) -> tuple[list[Outcome], int]:
    """Every request as a stream at once over a few connections; returns the outcomes and the most
    requests the engine held (running + waiting) at any poll."""
    channels, stubs = aio_stubs(daemon, 4)
    peak = 0
    done = asyncio.Event()

    async def watch_load():
        nonlocal peak
        while not done.is_set():
            load = await stubs[0].GetLoad(pb.GetLoadRequest(), timeout=TIMEOUT)
            peak = max(peak, load.num_running + load.num_waiting)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch_load())
    outcomes = await asyncio.gather(*(read_stream(stubs[i % len(stubs)].GenerateStream(r, timeout=TIMEOUT))
                                      for i, r in enumerate(requests)))
    done.set()
    await watcher
    await close_all(channels)
    return outcomes, peak


def test_500_concurrent_streams_equal_the_offline_engine_in_bounded_memory(main, offline):
    daemon, stub = main
    rng = random.Random(500)
    prompts = random_prompts(rng, 500, (2, 12))
    max_tokens = [rng.randint(16, 32) for _ in prompts]  # long enough that the burst overlaps in the engine
    expected = offline_greedy(offline, prompts, max_tokens)
    requests = [greedy(p, n) for p, n in zip(prompts, max_tokens)]
    rss_start = rss_bytes(daemon)
    rss_after = []
    for _ in range(2):
        outcomes, peak = asyncio.run(burst(daemon, requests))
        assert [o.code for o in outcomes] == [grpc.StatusCode.OK] * len(requests)
        assert all(o.complete and o.last.finish_reason == pb.FINISH_REASON_LENGTH for o in outcomes)
        assert [o.tokens for o in outcomes] == expected
        assert peak >= 100, f"at most {peak} requests in the engine at once: not concurrent enough to prove anything"
        wait_pool_idle(stub)
        rss_after.append(rss_bytes(daemon))
    assert rss_after[0] - rss_start < 300 << 20, (rss_start, rss_after)
    assert rss_after[1] - rss_after[0] < 64 << 20, (rss_start, rss_after)


# --- clients that leave early ---

def test_random_cancellations_mid_stream_leave_no_trace(main, offline):
    """Cancelled streams received a prefix of the right answer, the others all of it, and afterwards the
    same prompts (now hitting blocks the cancelled requests cached) still give the offline output."""
    daemon, stub = main
    rng = random.Random(7)
    prompts = random_prompts(rng, 48, (8, 40))
    max_tokens = [rng.randint(30, 120) for _ in prompts]
    expected = offline_greedy(offline, prompts, max_tokens)
    plans = [rng.choice(["after_messages", "after_seconds", "never"]) for _ in prompts]

    async def one(stub, request, plan) -> Outcome:
        call = stub.GenerateStream(request, timeout=TIMEOUT)
        if plan == "after_messages":
            return await read_stream(call, stop_after=rng.randint(1, 20))
        outcome = Outcome()
        reader = asyncio.create_task(read_stream(call, outcome))
        if plan == "after_seconds":
            await asyncio.sleep(rng.uniform(0, 0.3))
            call.cancel()
        return await reader

    async def run():
        channels, stubs = aio_stubs(daemon, 2)
        outcomes = await asyncio.gather(*(one(stubs[i % 2], greedy(p, n), plan)
                                          for i, (p, n, plan) in enumerate(zip(prompts, max_tokens, plans))))
        await close_all(channels)
        return outcomes

    before = scrape(daemon)
    outcomes = asyncio.run(run())
    for outcome, want, plan in zip(outcomes, expected, plans):
        assert outcome.code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED), outcome
        if outcome.code == grpc.StatusCode.OK:
            assert outcome.complete and outcome.tokens == want
        else:
            assert plan != "never" and outcome.tokens == want[:len(outcome.tokens)]
    wait_pool_idle(stub)
    # Each call counted once, as it ended; cancellations that reached the engine mid-generation end
    # there as aborted, so fewer tokens were generated than running every request to its end.
    after = scrape(daemon)
    def delta(name, label=""):
        return sample(after, name, label) - sample(before, name, label)
    num_cancelled = sum(o.code == grpc.StatusCode.CANCELLED for o in outcomes)
    assert 0 < num_cancelled < len(outcomes)
    # Every call the client saw end OK the server counted a success; a client may also cancel after the server
    # has sent all and ended the call (its messages still unread), which the server counted a success too. A call
    # cancelled before it reached the server is not the server's to count. None is counted twice.
    succeeded, cancelled = delta("beastserve_request_success_total"), \
        delta("beastserve_request_failure_total", 'code="CANCELLED"')
    assert succeeded >= len(outcomes) - num_cancelled and 0 < cancelled <= num_cancelled
    assert succeeded + cancelled <= len(outcomes)
    assert delta("beastserve_request_failure_total") == delta("beastserve_request_failure_total", 'code="CANCELLED"')
    assert delta("beastserve_generation_tokens_total") < sum(map(len, expected))
    again = [stub.Generate(greedy(p, n), timeout=TIMEOUT) for p, n in zip(prompts[:12], max_tokens)]
    assert [list(r.token_ids) for r in again] == expected[:12]
    assert sum(r.usage.cached_tokens for r in again) > 0, "no prefix-cache hit: the re-run proved nothing"
    wait_pool_idle(stub)


def test_deadlines_expiring_mid_generation_among_requests_that_finish(main, offline):
    daemon, stub = main
    rng = random.Random(11)
    prompts = random_prompts(rng, 32, (4, 24))
    expected = offline_greedy(offline, prompts, [64] * len(prompts))
    short, expiring = range(0, 32, 2), range(1, 32, 2)

    async def run():
        channels, stubs = aio_stubs(daemon, 2)
        calls = []
        for i, prompt in enumerate(prompts):
            if i in short:
                calls.append(read_stream(stubs[i % 2].GenerateStream(greedy(prompt, 8), timeout=TIMEOUT)))
            else:
                calls.append(read_stream(stubs[i % 2].GenerateStream(greedy(prompt, HOLD),
                                                                     timeout=rng.uniform(0.5, 1.5))))
        outcomes = await asyncio.gather(*calls)
        await close_all(channels)
        return outcomes

    outcomes = asyncio.run(run())
    for i in short:
        assert outcomes[i].complete and outcomes[i].tokens == expected[i][:8]
    for i in expiring:
        assert outcomes[i].code == grpc.StatusCode.DEADLINE_EXCEEDED, outcomes[i]
        assert outcomes[i].tokens[:64] == expected[i][:len(outcomes[i].tokens[:64])]
        assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in outcomes[i].chunks)
    assert sum(bool(outcomes[i].tokens) for i in expiring) > len(expiring) // 2, "deadlines hit before generation"
    wait_pool_idle(stub)


VANISHING_CLIENT = """
import sys, time, grpc
from server.proto.beastserve.v1 import generate_pb2 as pb, generate_pb2_grpc as pb_grpc
stub = pb_grpc.GenerationStub(grpc.insecure_channel(sys.argv[1]))
def request(i):
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=[i + 1, 7, 9]), sampling=pb.SamplingParams(temperature=0),
                              stopping=pb.StoppingCriteria(max_tokens=int(sys.argv[2]), ignore_eos=True))
streams = [stub.GenerateStream(request(i)) for i in range(8)]
unary = [stub.Generate.future(request(100 + i)) for i in range(4)]
for s in streams:
    next(s)
print("streaming", flush=True)
time.sleep(600)
"""


def test_a_client_killed_mid_stream_frees_everything(main):
    """SIGKILL: no cancel, no goodbye, the kernel resets the connection. Its calls end in the engine
    as aborted (not run to completion) and their blocks come back."""
    daemon, stub = main
    wait_pool_idle(stub)
    before = scrape(daemon)
    client = subprocess.Popen([sys.executable, "-c", VANISHING_CLIENT, daemon.address, str(HOLD)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "streaming"
        wait_for(lambda: (lo := stub.GetLoad(pb.GetLoadRequest())).num_running + lo.num_waiting == 12, 10,
                 "the client's calls never reached the engine")
    finally:
        client.kill()
        client.wait(timeout=10)
        client.stdout.close()
    wait_pool_idle(stub, timeout=10)
    after = scrape(daemon)
    # Aborted in the engine, not run to completion, and counted once: as a failure, not also as a success.
    success, failure = "beastserve_request_success_total", "beastserve_request_failure_total"
    for reason in ("length", "abort"):
        label = f'finished_reason="{reason}"'
        assert sample(after, success, label) == sample(before, success, label)
    assert sample(after, failure, 'code="CANCELLED"') - sample(before, failure, 'code="CANCELLED"') == 12


def test_every_expired_stream_is_counted_as_deadline_exceeded(main):
    daemon, stub = main
    n = 16
    before = scrape(daemon)

    async def run():
        channels, stubs = aio_stubs(daemon)
        outcomes = await asyncio.gather(*(read_stream(stubs[0].GenerateStream(greedy([i + 1, 2], HOLD),
                                                                              timeout=0.5 + 0.05 * i))
                                          for i in range(n)))
        await close_all(channels)
        return outcomes

    outcomes = asyncio.run(run())
    if [o.code for o in outcomes] != [grpc.StatusCode.DEADLINE_EXCEEDED] * n:
        raise RuntimeError(f"precondition: every stream should expire, got {[o.code for o in outcomes]}")
    wait_pool_idle(stub)
    failures, code = "beastserve_request_failure_total", 'code="DEADLINE_EXCEEDED"'
    after = scrape(daemon)
    assert sample(after, failures, code) - sample(before, failures, code) == n
    # Counted once: the engine's abort of an expired stream is no success.
    success, aborted = "beastserve_request_success_total", 'finished_reason="abort"'
    assert sample(after, success, aborted) == sample(before, success, aborted)


# A client that stops reading: with BDP probing off and a small window, the server's handler blocks on
# sending, so the call stays live in the server after the engine has finished the request (a request with fewer
# outputs than server.async_engine.MAX_PENDING_OUTPUTS: one further behind would be paused, not finished).
SLOW_READER = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]


def test_an_abort_racing_completion_does_not_cancel_a_later_request_with_the_same_id(main):
    daemon, stub = main
    with daemon.channel(options=SLOW_READER) as channel:
        call = pb_grpc.GenerationStub(channel).GenerateStream(greedy([1, 2, 3], 48, "reused", logprobs=20),
                                                              timeout=TIMEOUT)
        next(call)
        wait_pool_idle(stub)  # the engine is done with it; the unread call is not
        aborted = list(stub.Abort(pb.AbortRequest(request_ids=["reused"])).aborted_ids)
        chunks = list(call)
    # The engine had finished it: nothing was live to abort, and the call completes in full.
    assert aborted == [] and chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    retry = stub.Generate(greedy([1, 2, 3], 8, "reused"), timeout=TIMEOUT)
    assert retry.finish_reason == pb.FINISH_REASON_LENGTH and len(retry.token_ids) == 8, retry
    wait_pool_idle(stub)


# --- a full engine ---

def test_deadlines_expire_while_queued_and_leave_the_queue(queued, offline):
    """With one running slot taken, queued requests that time out leave the waiting queue at once
    (not when they would have been scheduled), and the queue still serves the next request."""
    daemon, stub = queued
    holder = stub.GenerateStream(greedy([1, 2, 3], HOLD, request_id="holder"), timeout=TIMEOUT)
    next(holder)
    num_waiters = 6

    async def expire_while_queued():
        channels, stubs = aio_stubs(daemon)
        requests = [(greedy([5, i + 1], 8), 0.2 + 0.1 * i) for i in range(num_waiters)]
        outcomes = await asyncio.gather(*(unary(stubs[0], r, timeout) if i % 2 else
                                          read_stream(stubs[0].GenerateStream(r, timeout=timeout))
                                          for i, (r, timeout) in enumerate(requests)))
        await close_all(channels)
        return outcomes

    outcomes = asyncio.run(expire_while_queued())
    assert [(o.code, o.tokens) for o in outcomes] == [(grpc.StatusCode.DEADLINE_EXCEEDED, [])] * num_waiters
    load = wait_for(lambda: (lo := stub.GetLoad(pb.GetLoadRequest())).num_waiting == 0 and lo, 2,
                    "expired requests linger in the waiting queue")
    assert load.num_running == 1, "the holder finished early; the queue was never blocked"
    follow_up = stub.Generate.future(greedy([4, 4, 4], 8), timeout=TIMEOUT)
    wait_for(lambda: stub.GetLoad(pb.GetLoadRequest()).num_waiting == 1, 5, "the follow-up never queued")
    assert list(stub.Abort(pb.AbortRequest(request_ids=["holder"])).aborted_ids) == ["holder"]
    assert list(holder)[-1].finish_reason == pb.FINISH_REASON_ABORT
    assert list(follow_up.result(timeout=TIMEOUT).token_ids) == offline_greedy(offline, [[4, 4, 4]], [8])[0]
    wait_pool_idle(stub)


def test_queue_overflow_refuses_the_excess_and_answers_every_accepted_request(queued, offline):
    daemon, stub = queued
    sent = 40
    rng = random.Random(40)
    prompts = random_prompts(rng, sent, (2, 10))
    max_tokens = [rng.randint(2, 8) for _ in prompts]
    expected = offline_greedy(offline, prompts, max_tokens)
    before = scrape(daemon)
    holder = stub.GenerateStream(greedy([1, 2, 3], HOLD, request_id="holder-2"), timeout=TIMEOUT)
    next(holder)

    async def run():
        channels, stubs = aio_stubs(daemon, 1)
        calls = [asyncio.create_task(read_stream(stubs[0].GenerateStream(greedy(p, n), timeout=TIMEOUT)) if i % 2
                                     else unary(stubs[0], greedy(p, n)))
                 for i, (p, n) in enumerate(zip(prompts, max_tokens))]
        # Every call is either refused already or waiting behind the holder.
        deadline = time.monotonic() + 10
        while sum(c.done() for c in calls) + (await stubs[0].GetLoad(pb.GetLoadRequest())).num_waiting < sent:
            assert time.monotonic() < deadline, "calls neither refused nor queued"
            await asyncio.sleep(0.01)
        load = await stubs[0].GetLoad(pb.GetLoadRequest())
        assert load.num_waiting == MAX_QUEUE and load.num_running == 1
        await stubs[0].Abort(pb.AbortRequest(request_ids=["holder-2"]))
        outcomes = await asyncio.gather(*calls)
        await close_all(channels)
        return outcomes

    outcomes = asyncio.run(run())
    assert list(holder)[-1].finish_reason == pb.FINISH_REASON_ABORT
    accepted = [i for i, o in enumerate(outcomes) if o.code == grpc.StatusCode.OK]
    rejected = [o for o in outcomes if o.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(accepted) + len(rejected) == sent, [o.code for o in outcomes]
    assert len(accepted) == MAX_QUEUE
    assert all("max_queue_size" in o.details for o in rejected)
    assert all(outcomes[i].complete and outcomes[i].tokens == expected[i] for i in accepted)
    wait_pool_idle(stub)
    failures = "beastserve_request_failure_total"
    code = 'code="RESOURCE_EXHAUSTED"'
    assert sample(scrape(daemon), failures, code) - sample(before, failures, code) == len(rejected)


def test_kv_exhaustion_preempts_yet_outputs_equal_the_offline_engine(main, offline):
    daemon, stub = main
    rng = random.Random(16)
    prompts = random_prompts(rng, 40, (8, 24))
    max_tokens = [rng.randint(260, 300) for _ in prompts]  # the pool runs out near token 210
    expected = offline_greedy(offline, prompts, max_tokens)
    before = sample(scrape(daemon), "beastserve_num_preemptions_total")
    outcomes, _ = asyncio.run(burst(daemon, [greedy(p, n) for p, n in zip(prompts, max_tokens)]))
    assert all(o.complete for o in outcomes), [o.code for o in outcomes]
    assert [o.tokens for o in outcomes] == expected
    preempted = sum(o.last.timing.preemptions for o in outcomes)
    assert preempted > 0
    assert sample(scrape(daemon), "beastserve_num_preemptions_total") - before == preempted
    assert wait_pool_idle(stub).kv_blocks_total == MAIN_KV_BLOCKS


# --- a failing engine ---

def test_engine_fault_fails_in_flight_calls_internal_drops_readiness_and_exits_1(fleet):
    daemon = ready(fleet, "faulty")

    async def run():
        channel = grpc.aio.insecure_channel(daemon.address)
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.GenerationStub(channel)
        statuses = []
        watch = health.Watch(health_pb2.HealthCheckRequest(service=READINESS))

        async def follow_readiness():
            async for reply in watch:
                statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
                if statuses[-1] == "NOT_SERVING":
                    return

        watcher = asyncio.create_task(follow_readiness())
        streams = [read_stream(stub.GenerateStream(greedy([i + 1, 2], HOLD), timeout=TIMEOUT)) for i in range(8)]
        outcomes = await asyncio.gather(unary(stub, greedy([9, 9], HOLD)), *streams)
        failed_at = time.monotonic()
        late = await unary(stub, greedy([3], 4))
        await asyncio.wait_for(watcher, timeout=10)
        watch.cancel()
        await channel.close()
        return outcomes, late, statuses, failed_at

    outcomes, late, statuses, failed_at = asyncio.run(run())
    for outcome in outcomes:
        assert outcome.code == grpc.StatusCode.INTERNAL and "engine failure" in outcome.details, outcome
        assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in outcome.chunks)
    assert all(o.tokens for o in outcomes[1:]), "a stream failed before it started: not a mid-stream fault"
    assert late.code == grpc.StatusCode.UNAVAILABLE, late
    assert statuses == ["SERVING", "NOT_SERVING"]
    assert daemon.proc.wait(timeout=10) == 1
    assert time.monotonic() - failed_at < 5
    assert "injected fault" in daemon.log()


def test_every_kind_of_ending_is_counted_exactly_once(main, offline):
    """Finished by a stop token, by length, by Abort, cancelled by the client, expired, refused: the success and
    failure counters together move by the number of calls made, whatever the mix."""
    daemon, stub = main
    prompt = [5, 6, 7]
    (first,) = offline_greedy(offline, [prompt], [1])
    stop = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(temperature=0),
                              stopping=pb.StoppingCriteria(max_tokens=8, stop_token_ids=first))
    invalid = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), stopping=pb.StoppingCriteria(max_tokens=0))
    before = scrape(daemon)

    async def run():
        channels, (aio,) = aio_stubs(daemon)
        held = aio.GenerateStream(greedy(prompt, HOLD, request_id="to-abort"), timeout=TIMEOUT)
        reading = asyncio.ensure_future(read_stream(held))
        outcomes = await asyncio.gather(
            unary(aio, stop), read_stream(aio.GenerateStream(stop, timeout=TIMEOUT)),
            unary(aio, greedy(prompt, 4)), read_stream(aio.GenerateStream(greedy(prompt, 4), timeout=TIMEOUT)),
            read_stream(aio.GenerateStream(greedy(prompt, HOLD), timeout=TIMEOUT), stop_after=2),
            read_stream(aio.GenerateStream(greedy(prompt, HOLD), timeout=0.5)),
            unary(aio, greedy(prompt, HOLD), timeout=0.5),
            unary(aio, invalid), read_stream(aio.GenerateStream(invalid, timeout=TIMEOUT)))
        while not (await aio.Abort(pb.AbortRequest(request_ids=["to-abort"]))).aborted_ids:
            await asyncio.sleep(0.01)
        outcomes.append(await reading)
        await close_all(channels)
        return outcomes

    outcomes = asyncio.run(run())
    codes = [o.code for o in outcomes]
    ok, invalid_code = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT
    assert codes == [ok] * 4 + [grpc.StatusCode.CANCELLED] + [grpc.StatusCode.DEADLINE_EXCEEDED] * 2 \
        + [invalid_code] * 2 + [ok], codes
    assert [o.last.finish_reason for o in outcomes[:4]] == [pb.FINISH_REASON_STOP] * 2 + [pb.FINISH_REASON_LENGTH] * 2
    assert outcomes[-1].last.finish_reason == pb.FINISH_REASON_ABORT
    wait_pool_idle(stub)
    after = scrape(daemon)

    def moved(name: str, label: str = "") -> float:
        return sample(after, name, label) - sample(before, name, label)

    successes, failures = "beastserve_request_success_total", "beastserve_request_failure_total"
    assert moved(successes) + moved(failures) == len(outcomes)
    assert [moved(successes, f'finished_reason="{r}"') for r in ("stop", "length", "abort")] == [2, 2, 1]
    assert [moved(failures, f'code="{c}"') for c in ("CANCELLED", "DEADLINE_EXCEEDED", "INVALID_ARGUMENT")] \
        == [1, 2, 2]
