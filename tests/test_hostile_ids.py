"""Request ids are the client's, sequence ids the engine's: no request id, however it is spelled, reaches another
request's state. `grp` with n=2 beside `grp#0`, on either protocol, under load, leaves every other stream whole and
the daemon serving; an id in flight is refused on both protocols; a request whose own processing raises in the
step ends alone, its blocks freed."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpb_grpc

from scheduler import Engine, SamplingParams
from server.proto.beastserve.v1 import generate_pb2 as pb
from server.proto.beastserve.v1 import generate_pb2_grpc as pb_grpc
from tests.helpers import assert_pool_idle

PROMPT = list(range(3, 40))
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def daemon(tiny_text_daemon):
    return tiny_text_daemon


@pytest.fixture(scope="module")
def stubs(daemon):
    with daemon.channel() as channel:
        yield pb_grpc.GenerationStub(channel), vpb_grpc.VllmEngineStub(channel)


def v1(request_id: str, n: int = 1, max_tokens: int = MAX_TOKENS) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=request_id, token_ids=pb.TokenIds(ids=PROMPT),
                              sampling=pb.SamplingParams(n=n, temperature=1.0),
                              stopping=pb.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True))


def vllm(request_id: str, n: int = 1, max_tokens: int = MAX_TOKENS) -> vpb.GenerateRequest:
    return vpb.GenerateRequest(request_id=request_id, tokenized=vpb.TokenizedInput(input_ids=PROMPT),
                               sampling_params=vpb.SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens,
                                                                  ignore_eos=True), stream=True)


def v1_tokens(stub, request: pb.GenerateRequest) -> dict[int, int]:
    """Output tokens per completion index, read to the end of the stream."""
    counts: dict[int, int] = {}
    for response in stub.GenerateStream(request, timeout=60):
        counts[response.index] = counts.get(response.index, 0) + len(response.token_ids)
    return counts


def vllm_tokens(stub, request: vpb.GenerateRequest) -> dict[int, int]:
    counts: dict[int, int] = {}
    for response in stub.Generate(request, timeout=60):
        if response.HasField("complete"):
            counts[response.complete.index] = response.complete.completion_tokens
    return counts


@pytest.mark.parametrize("first, second", [("grp", "grp#0"), ("grp#1", "grp")], ids=["n-first", "spelled-first"])
def test_an_id_spelled_like_a_completion_leaves_every_stream_whole(daemon, stubs, first, second):
    generation, engine = stubs
    with ThreadPoolExecutor(16) as pool:
        others = [pool.submit(v1_tokens, generation, v1(f"other-{i}")) for i in range(6)]
        others += [pool.submit(vllm_tokens, engine, vllm(f"gw-{i}")) for i in range(6)]
        # The pair on each protocol: one with n=2, one spelled like its completions' old keys.
        pair = [pool.submit(v1_tokens, generation, v1(f"v1-{first}", n=2 if first == "grp" else 1)),
                pool.submit(v1_tokens, generation, v1(f"v1-{second}", n=2 if second == "grp" else 1)),
                pool.submit(vllm_tokens, engine, vllm(f"gw-{first}", n=2 if first == "grp" else 1)),
                pool.submit(vllm_tokens, engine, vllm(f"gw-{second}", n=2 if second == "grp" else 1))]
        results = [f.result() for f in others + pair]
    assert all(counts == {0: MAX_TOKENS} for counts in results[:12])
    assert sorted(map(len, results[12:])) == [1, 1, 2, 2]  # each answered in full, n=2 on both indexes
    assert all(set(counts.values()) == {MAX_TOKENS} for counts in results[12:])
    assert daemon.health() == "SERVING" and "engine step failed" not in daemon.log()


def test_an_id_in_flight_is_refused_on_either_protocol(daemon, stubs):
    generation, engine = stubs
    long = generation.GenerateStream(v1("taken", max_tokens=400), timeout=60)
    next(long)  # it is in flight
    try:
        for call in (lambda: generation.Generate(v1("taken"), timeout=10),
                     lambda: list(engine.Generate(vllm("taken"), timeout=10))):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details().startswith("request_id: 'taken' is already in use")
    finally:
        long.cancel()
    deadline = time.monotonic() + 10
    while True:  # free again once the cancel has reached the engine
        try:
            assert generation.Generate(v1("taken"), timeout=30).usage.completion_tokens == MAX_TOKENS
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and time.monotonic() < deadline
            time.sleep(0.05)


def test_a_request_whose_processing_raises_ends_alone(tiny_model_dir):
    engine = Engine(model=str(tiny_model_dir[0]), max_num_batched_tokens=128, kv_cache_bytes=64 << 10)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    bad = engine.add_request(None, params, prompt_token_ids=PROMPT, request_id="bad")
    good = engine.add_request(None, params, prompt_token_ids=PROMPT, request_id="good")
    unreadable = engine.add_request(None, params, prompt_token_ids=PROMPT, request_id="unreadable")
    engine.step()

    class Exploding:
        def __getattr__(self, name):
            raise RuntimeError("detokenizer broke")

    delivered = []  # with on_output set, a stream's outputs go to it only

    def refuse(output):
        delivered.append(output)
        raise RuntimeError("reader gone")

    engine._groups["bad"][0].detokenizer = Exploding()  # its stop checks and deltas raise
    unreadable.on_output = refuse  # handing it its outputs raises
    for _ in range(200):
        if not engine.has_unfinished():
            break
        engine.step()
    outputs = {s.request_id: list(iter(s.get_nowait, None)) for s in (bad, good)}
    assert outputs["bad"][-1].finished and outputs["bad"][-1].error.startswith("request failed: RuntimeError")
    assert sum(len(o.token_ids) for o in outputs["good"]) == MAX_TOKENS and outputs["good"][-1].error is None
    assert delivered[-1].finished and delivered[-1].finish_reason == "abort"
    assert_pool_idle(engine)


def test_a_request_that_fails_alone_is_told_so_and_the_engine_stays_alive(tiny_model_dir, monkeypatch):
    """The service's status for a request that failed alone says so: it is not an engine failure."""
    import asyncio

    from scheduler.loop import engine as engine_module
    from server.async_engine import AsyncEngine, RequestFailedError

    engine = Engine(model=str(tiny_model_dir[0]), max_num_batched_tokens=128, kv_cache_bytes=64 << 10)
    check = engine_module.check_new_tokens

    def check_or_raise(live, result, now):  # a request's stop checks: its first token always reaches them
        if live.request.output_id == "bad":
            raise RuntimeError("detokenizer broke")
        return check(live, result, now)

    monkeypatch.setattr(engine_module, "check_new_tokens", check_or_raise)
    served = AsyncEngine(engine)
    served.start()
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)

    async def tokens(request_id):
        return sum([len(o.token_ids) async for o in served.generate(PROMPT, params, request_id)])

    async def both():
        return await asyncio.gather(tokens("bad"), tokens("good"), return_exceptions=True)

    try:
        bad, good = asyncio.run(both())
        assert isinstance(bad, RequestFailedError) and "detokenizer broke" in str(bad)
        assert good == MAX_TOKENS and served.alive
    finally:
        served.stop()
    assert_pool_idle(engine)
