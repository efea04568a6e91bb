"""A bounded soak (`make test-slow`): a few minutes of mixed traffic — streams and unary calls of
random lengths, sampled and greedy, cancellations, deadlines, Abort calls, bad input and a queue that
overflows — against one daemon. At the end nothing is lost (every call completed in full or ended
with an explicit status, and the counts add up), greedy answers equal the offline engine's, the
block pool is back at its baseline and memory did not creep."""

from __future__ import annotations

import asyncio
import collections
import os
import random
import time

import grpc
import pytest

from scheduler import LLM, SamplingParams
from server.proto.beastserve.v1 import generate_pb2 as pb
from server.proto.beastserve.v1 import generate_pb2_grpc as pb_grpc
from tests.daemon import Daemon
from tests.test_reliability import Outcome, aio_stubs, close_all, read_stream, rss_bytes, unary
from tests.test_server import sample, scrape, wait_pool_idle

DURATION_S = float(os.environ.get("SOAK_SECONDS", 150))  # shorter for a quick look
MAX_REQUESTS = 20_000
NUM_CLIENTS = 18  # more than running slots + queue, so the queue overflows at times
MAX_NUM_SEQS, MAX_QUEUE = 8, 8
KV_BLOCKS = 20  # 8 requests want ~25 on average: preemption happens
BLOCK_BYTES = 2 * 2 * 2 * 16 * 4 * 16  # tiny_config(): layers x (k, v) x kv heads x head dim x fp32 x tokens
WARMUP_S = DURATION_S / 5  # memory is compared from here, after allocator and caches settle
PROMPTS = [f"Soak prompt {i}: " + "lorem ipsum " * (i % 7) for i in range(24)]
GREEDY_LENGTHS = (4, 16, 48)
# What each call may end with, by how the client treated it.
EXPECTED = {
    "plain": {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED},
    "cancel": {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED},
    "deadline": {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED},
    "abort": {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED},  # OK with finish_reason ABORT
    "invalid": {grpc.StatusCode.INVALID_ARGUMENT},
}


@pytest.fixture(scope="module")
def daemon(tiny_text_model_dir, tmp_path_factory):
    path, _ = tiny_text_model_dir
    d = Daemon(path, "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue-size", str(MAX_QUEUE),
               "--kv-cache-bytes", str(KV_BLOCKS * BLOCK_BYTES), "--max-num-batched-tokens", "256",
               log_path=tmp_path_factory.mktemp("log") / "daemon.log")
    yield d.wait_ready()
    assert d.close() == 0


class Traffic:
    """NUM_CLIENTS clients, each sending one call at a time until the time or request budget runs out."""

    def __init__(self, daemon: Daemon, seed: int):
        self.daemon = daemon
        self.rng = random.Random(seed)
        self.sent = 0
        self.ended: collections.Counter = collections.Counter()  # (treatment, code, finish reason)
        self.unexpected: list[tuple[str, Outcome]] = []
        self.greedy: dict[tuple[int, int], list[list[int]]] = collections.defaultdict(list)  # complete answers
        self.partial: dict[tuple[int, int], list[list[int]]] = collections.defaultdict(list)  # cut short
        self.rss: dict[str, int] = {}

    async def run(self) -> None:
        channels, stubs = aio_stubs(self.daemon, 4)
        self.deadline = time.monotonic() + DURATION_S
        sampler = asyncio.create_task(self._sample_rss())
        await asyncio.gather(*(self._client(stubs[i % len(stubs)], i) for i in range(NUM_CLIENTS)))
        sampler.cancel()
        await close_all(channels)

    async def _sample_rss(self) -> None:
        await asyncio.sleep(WARMUP_S)
        self.rss["warm"] = rss_bytes(self.daemon)

    async def _client(self, stub, client: int) -> None:
        while time.monotonic() < self.deadline and self.sent < MAX_REQUESTS:
            self.sent += 1
            request_id = f"c{client}-{self.sent}"
            treatment = self.rng.choices(list(EXPECTED), weights=[60, 20, 10, 5, 5])[0]
            key, request = self._request(request_id, treatment)
            outcome = await self._call(stub, request, request_id, treatment)
            self._record(treatment, key, outcome)
            if outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # back off, as a real client would
                await asyncio.sleep(self.rng.uniform(0.1, 0.5))

    def _request(self, request_id: str, treatment: str) -> tuple[tuple[int, int] | None, pb.GenerateRequest]:
        rng = self.rng
        index = rng.randrange(len(PROMPTS))
        request = pb.GenerateRequest(request_id=request_id, text=PROMPTS[index])
        if treatment == "invalid":
            request.sampling.top_p = rng.choice([0.0, 1.5, float("nan")])
            return None, request
        if rng.random() < 0.5:
            max_tokens = rng.choice(GREEDY_LENGTHS)
            request.sampling.temperature = 0
            request.stopping.CopyFrom(pb.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True))
            return (index, max_tokens), request
        request.sampling.CopyFrom(pb.SamplingParams(temperature=rng.uniform(0.5, 1.5), top_p=rng.uniform(0.5, 1),
                                                    seed=rng.randrange(2**31)))
        request.stopping.CopyFrom(pb.StoppingCriteria(max_tokens=rng.randint(1, 64)))
        return None, request

    async def _call(self, stub, request: pb.GenerateRequest, request_id: str, treatment: str) -> Outcome:
        rng = self.rng
        timeout = rng.uniform(0.05, 1.0) if treatment == "deadline" else 60
        if rng.random() < 0.5 and treatment != "cancel":
            task = asyncio.create_task(unary(stub, request, timeout=timeout))
        else:
            call = stub.GenerateStream(request, timeout=timeout)
            stop_after = rng.randint(1, 8) if treatment == "cancel" else None
            task = asyncio.create_task(read_stream(call, stop_after=stop_after))
        if treatment == "abort":
            await asyncio.sleep(rng.uniform(0, 0.2))
            await stub.Abort(pb.AbortRequest(request_ids=[request_id]), timeout=60)
        return await task

    def _record(self, treatment: str, key, outcome: Outcome) -> None:
        finish = pb.FinishReason.Name(outcome.last.finish_reason) if outcome.code == grpc.StatusCode.OK else ""
        self.ended[treatment, outcome.code.name, finish] += 1
        ok = outcome.code == grpc.StatusCode.OK
        if outcome.code not in EXPECTED[treatment] or (ok and not outcome.complete) or \
                (not ok and not outcome.details):
            self.unexpected.append((treatment, outcome))
        if key is None:
            return
        if ok and outcome.last.finish_reason == pb.FINISH_REASON_LENGTH:
            self.greedy[key].append(outcome.tokens)
        elif outcome.tokens:
            self.partial[key].append(outcome.tokens)


@pytest.mark.slow
def test_mixed_traffic_soak_loses_nothing_and_leaks_nothing(daemon, tiny_text_model_dir):
    rss_start = rss_bytes(daemon)
    traffic = Traffic(daemon, seed=2024)
    started = time.monotonic()
    asyncio.run(traffic.run())
    elapsed = time.monotonic() - started
    with daemon.channel() as channel:
        wait_pool_idle(pb_grpc.GenerationStub(channel), timeout=30)
    rss_end = rss_bytes(daemon)
    summary = dict(sorted(traffic.ended.items()))
    preemptions = sample(scrape(daemon), "beastserve_num_preemptions_total")
    print(f"soak: {traffic.sent} calls in {elapsed:.0f} s, {preemptions:.0f} preemptions; RSS {rss_start >> 20} -> "
          f"{traffic.rss.get('warm', 0) >> 20} -> {rss_end >> 20} MiB; {summary}")

    assert elapsed < DURATION_S + 60
    assert sum(traffic.ended.values()) == traffic.sent, "a call was lost"
    assert not traffic.unexpected, traffic.unexpected[:5]
    codes = collections.Counter(code for (_, code, _) in traffic.ended)
    for code in ("OK", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"):
        assert codes[code] > 0, f"the soak never produced {code}: {summary}"
    assert any(finish == "FINISH_REASON_ABORT" for (t, _, finish) in traffic.ended if t == "abort")
    assert preemptions > 0, "the KV cache never ran out"

    path, _ = tiny_text_model_dir
    offline = LLM(str(path))
    keys = sorted(traffic.greedy.keys() | traffic.partial.keys())
    expected = offline.generate([PROMPTS[i] for i, _ in keys],
                                [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in keys])
    for key, want in zip(keys, expected):
        assert all(tokens == want.token_ids for tokens in traffic.greedy[key]), key
        assert all(tokens == want.token_ids[:len(tokens)] for tokens in traffic.partial[key]), key

    assert rss_end - rss_start < 400 << 20, (rss_start, rss_end)
    assert rss_end - traffic.rss["warm"] < 100 << 20, (traffic.rss["warm"], rss_end)
    assert daemon.health() == "SERVING"
