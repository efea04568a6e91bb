"""SIGTERM drains the daemon: readiness drops while liveness holds, new calls get UNAVAILABLE, in-flight
requests finish within --drain-timeout, those still running then end UNAVAILABLE, and the process exits 0."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from scheduler import SamplingParams
from server.calls import EngineCalls, ServerState
from server.config import ServerConfig
from server.proto.beastserve.v1 import generate_pb2 as pb
from server.proto.beastserve.v1 import generate_pb2_grpc
from tests.conftest import save_tiny_model, tiny_config
from tests.daemon import Daemon
from tests.openai_http import call

MAX_MODEL_LEN = 4096
PROMPT_IDS = list(range(1, 13))
NUM_STREAMS = 8
# Drains that must let every call finish get far more time than the calls need: on a busy 2-core CPU a
# 4084-token stream that takes ~5 s alone takes ~20 s. A drain that wrongly stops early still ends them within
# the server's 2 s grace, long before this.
DRAIN_TIMEOUT = 120
TIMEOUT = DRAIN_TIMEOUT + 60  # client-side guard on every call: a hang fails as DEADLINE_EXCEEDED
KV_CACHE = ("--kv-cache-bytes", str(32 << 20))  # room for every request at full length, allocated in no time


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    """The tiny Llama with a 4096-token context: a request can outlast a short drain by far
    (on a 2-core CPU, 8 streams of 800 tokens take ~3 s, of 4000 tokens ~18 s)."""
    path = tmp_path_factory.mktemp("tiny-llama-4k")
    save_tiny_model(path, tiny_config(max_position_embeddings=MAX_MODEL_LEN))
    return path


@pytest.fixture
def start_daemon(long_model_dir, tmp_path):
    started = []

    def start(*flags: str) -> Daemon:
        daemon = Daemon(long_model_dir, *flags, *KV_CACHE, log_path=tmp_path / "daemon.log")
        started.append(daemon)
        return daemon.wait_ready()

    yield start
    for daemon in started:
        daemon.close(timeout=30)  # a no-op after a passing test; stops the daemon when one failed midway


def long_request(max_tokens: int, request_id: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=request_id, token_ids=pb.TokenIds(ids=PROMPT_IDS),
                              sampling=pb.SamplingParams(temperature=0),
                              stopping=pb.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True))


class Stream(threading.Thread):
    """One streaming call read to its end in a thread: what came back, and the status it ended with."""

    def __init__(self, stub, max_tokens: int, request_id: str = ""):
        super().__init__(daemon=True)
        self.stub, self.max_tokens, self.request_id = stub, max_tokens, request_id
        self.chunks: list[pb.GenerateResponse] = []
        self.code = grpc.StatusCode.OK
        self.first_message = threading.Event()
        self.ended_at: float | None = None

    def run(self):
        try:
            for chunk in self.stub.GenerateStream(long_request(self.max_tokens, self.request_id), timeout=TIMEOUT):
                self.chunks.append(chunk)
                self.first_message.set()
        except grpc.RpcError as err:
            self.code = err.code()
        finally:
            self.ended_at = time.monotonic()
            self.first_message.set()  # never leave the test waiting

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


def start_calls(stub, max_tokens: int) -> tuple[grpc.Future, list[Stream]]:
    """One unary call and NUM_STREAMS streams, returned once every stream has received its first
    message and the engine runs all of them."""
    unary = stub.Generate.future(long_request(max_tokens), timeout=TIMEOUT)
    streams = [Stream(stub, max_tokens) for _ in range(NUM_STREAMS)]
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.first_message.wait(timeout=TIMEOUT) and stream.chunks, f"no first message ({stream.code})"
    deadline = time.monotonic() + 10
    while stub.GetLoad(pb.GetLoadRequest(), timeout=TIMEOUT).num_running < NUM_STREAMS + 1:
        assert time.monotonic() < deadline, "the unary call never started running"
        time.sleep(0.01)
    assert not unary.done() and not any(s.ended_at for s in streams), "a call ended before SIGTERM; make it longer"
    return unary, streams


def wait_until_not_ready(daemon: Daemon, timeout: float = 10) -> None:
    """Poll readiness after SIGTERM; the health call raises if the process is already gone."""
    deadline = time.monotonic() + timeout
    while daemon.health() == "SERVING":
        assert time.monotonic() < deadline, "readiness still SERVING after SIGTERM"
        time.sleep(0.02)


def test_sigterm_drops_readiness_refuses_new_calls_and_lets_in_flight_calls_finish(start_daemon):
    daemon = start_daemon("--drain-timeout", str(DRAIN_TIMEOUT))
    max_tokens = 800
    with daemon.channel() as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        unary, streams = start_calls(stub, max_tokens)
        daemon.terminate()
        wait_until_not_ready(daemon)
        # Not ready for traffic, yet alive: an orchestrator must not kill a draining process.
        assert daemon.health("") == "SERVING"
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(long_request(4), timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # The HTTP API drains with it: 503, and readiness says why.
        status, body = call(daemon.http_url + "/v1/completions", {"prompt": PROMPT_IDS, "max_tokens": 4})
        assert status == 503 and "shutting down" in body["error"]["message"]
        assert call(daemon.http_url + "/health")[0] == 503
        assert not all(s.ended_at for s in streams), "the drain ended before it was observed; make streams longer"
        for stream in streams:
            stream.join(timeout=TIMEOUT + 5)
        response = unary.result(timeout=TIMEOUT)
    assert len(response.token_ids) == max_tokens and response.finish_reason == pb.FINISH_REASON_LENGTH
    for stream in streams:
        assert not stream.is_alive()
        assert stream.code == grpc.StatusCode.OK
        assert stream.num_tokens == max_tokens
        assert stream.chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert stream.chunks[-1].usage.completion_tokens == max_tokens
    assert daemon.proc.wait(timeout=30) == 0


def test_drain_timeout_ends_unfinished_calls_unavailable(start_daemon):
    drain_timeout = 1
    daemon = start_daemon("--drain-timeout", str(drain_timeout))
    max_tokens = MAX_MODEL_LEN - len(PROMPT_IDS)
    with daemon.channel() as channel:
        unary, streams = start_calls(generate_pb2_grpc.GenerationStub(channel), max_tokens)
        daemon.terminate()
        sigterm_at = time.monotonic()
        wait_until_not_ready(daemon)
        assert daemon.health("") == "SERVING"
        for stream in streams:
            stream.join(timeout=TIMEOUT + 5)
        assert unary.exception(timeout=TIMEOUT).code() == grpc.StatusCode.UNAVAILABLE
    for stream in streams:
        assert not stream.is_alive()
        assert stream.code == grpc.StatusCode.UNAVAILABLE
        assert 0 < stream.num_tokens < max_tokens
        # Ended by the drain timeout, not by running to the end (which takes many times longer).
        assert stream.ended_at - sigterm_at < drain_timeout + 5
    assert daemon.proc.wait(timeout=30) == 0


def test_a_refused_duplicate_request_id_does_not_hide_the_live_call_from_the_drain(start_daemon):
    daemon = start_daemon("--drain-timeout", str(DRAIN_TIMEOUT))
    max_tokens = MAX_MODEL_LEN - len(PROMPT_IDS)  # runs several seconds alone, longer than the server's 2 s grace
    with daemon.channel() as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        stream = Stream(stub, max_tokens, request_id="same-id")
        stream.start()
        assert stream.first_message.wait(timeout=TIMEOUT) and stream.chunks
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(long_request(4, request_id="same-id"), timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        daemon.terminate()
        stream.join(timeout=TIMEOUT + 5)
    assert not stream.is_alive()
    assert stream.code == grpc.StatusCode.OK
    assert stream.num_tokens == max_tokens
    assert daemon.proc.wait(timeout=30) == 0
    # The drain counted the live call, whatever the machine's speed: had the refusal dropped it, the drain
    # would have found nothing to wait for.
    assert "draining 1 in-flight requests" in daemon.log()


class RecordingContext:
    """A servicer context that notes how many calls the server still counted when a status went out."""

    def __init__(self, state):
        self.state, self.counted_at_status = state, None

    async def abort(self, code, message):
        self.counted_at_status = len(self.state.in_flight)
        raise grpc.aio.AbortError()

    def time_remaining(self):
        return None


class RefusingEngine:
    alive = True

    async def generate(self, *args, **kwargs):
        raise ValueError("request_id 'same-id' is already running")
        yield


def test_a_refused_call_is_uncounted_before_its_status_goes_out():
    """A client that has its refusal may send SIGTERM at once: the drain must not still count the refused call."""
    state = ServerState(ServerConfig(), engine=RefusingEngine())
    context = RecordingContext(state)

    async def call():
        async for _ in EngineCalls(state).run(context, [1, 2], SamplingParams(), "same-id"):
            pass

    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(call())
    assert context.counted_at_status == 0 and not state.in_flight
