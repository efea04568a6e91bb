"""Invariant 5 for a client that stops reading: its request is paused in the engine while its messages wait
(nothing more is generated for it), and after --stream-write-timeout its call ends DEADLINE_EXCEEDED, its
request aborted and its blocks freed, out of the in-flight count, on both generation services."""

from __future__ import annotations

import time

import pytest
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpb_grpc

from server.proto.beastserve.v1 import generate_pb2 as pb
from server.proto.beastserve.v1 import generate_pb2_grpc as pb_grpc
from tests.daemon import Daemon
from tests.slow_reader import SlowReader
from tests.test_server import sample, scrape

WRITE_TIMEOUT_S = 3
MAX_TOKENS = 400
GENERATION_STREAM = "/beastserve.v1.Generation/GenerateStream"
VLLM_GENERATE = "/vllm.grpc.engine.VllmEngine/Generate"


@pytest.fixture(scope="module")
def daemon(tiny_model_dir, tmp_path_factory):
    daemon = Daemon(tiny_model_dir[0], "--max-model-len", "512", "--stream-write-timeout", str(WRITE_TIMEOUT_S),
                    log_path=tmp_path_factory.mktemp("log") / "daemon.log")
    yield daemon.wait_ready()
    started = time.monotonic()
    assert daemon.close() == 0
    assert time.monotonic() - started < 10, "the drain waited for calls that had ended"


def _requests(i: int) -> tuple[bytes, bytes]:
    prompt = [1 + i, 2, 3, 4, 5]
    ours = pb.GenerateRequest(request_id=f"slow-{i}", token_ids=pb.TokenIds(ids=prompt),
                              sampling=pb.SamplingParams(temperature=0),
                              stopping=pb.StoppingCriteria(max_tokens=MAX_TOKENS, ignore_eos=True))
    theirs = vpb.GenerateRequest(request_id=f"slow-vllm-{i}", tokenized=vpb.TokenizedInput(input_ids=prompt),
                                 sampling_params=vpb.SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                                    ignore_eos=True), stream=True)
    return ours.SerializeToString(), theirs.SerializeToString()


def _load(daemon) -> pb.Load:
    with daemon.channel() as channel:
        return pb_grpc.GenerationStub(channel).GetLoad(pb.GetLoadRequest(), timeout=5)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def test_a_client_that_stops_reading_is_paused_then_ended(daemon):
    generated = "beastserve_generation_tokens_total"
    timed_out = ("beastserve_request_failure_total", 'code="DEADLINE_EXCEEDED"')
    before = scrape(daemon)
    reader = SlowReader(daemon.address, window=64)
    try:
        streams = []
        for i in range(3):
            ours, theirs = _requests(i)
            streams += [reader.open_stream(GENERATION_STREAM, ours), reader.open_stream(VLLM_GENERATE, theirs)]

        def paused() -> bool:  # generation has stopped while the requests still hold their blocks
            first = sample(scrape(daemon), generated)
            time.sleep(0.5)
            load = _load(daemon)
            return first > sample(before, generated) and sample(scrape(daemon), generated) == first \
                and load.kv_blocks_free < load.kv_blocks_total

        _wait_for(paused, WRITE_TIMEOUT_S - 1, "generation paused with blocks held")
        assert sample(scrape(daemon), generated) - sample(before, generated) < len(streams) * MAX_TOKENS / 2
        with daemon.channel() as channel:  # others are served meanwhile
            answer = pb_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=[7, 8]), stopping=pb.StoppingCriteria(max_tokens=4, ignore_eos=True)),
                timeout=10)
            assert len(answer.token_ids) == 4

        def ended() -> bool:
            load = _load(daemon)
            with daemon.channel() as channel:
                info = vpb_grpc.VllmEngineStub(channel).GetServerInfo(vpb.GetServerInfoRequest(), timeout=5)
            return load.kv_blocks_free == load.kv_blocks_total and load.num_running == load.num_waiting == 0 \
                and info.active_requests == 0

        _wait_for(ended, WRITE_TIMEOUT_S + 3, "blocks freed and calls out of the in-flight count")
        assert sample(scrape(daemon), *timed_out) == sample(before, *timed_out) + len(streams)
        assert not reader.ended  # nothing reached a client that reads nothing ...
        reader.read_everything()  # ... and a client that reads again gets each call's status
        _wait_for(lambda: len(reader.trailers) == len(streams), 5, "every stream's trailers")
        assert all(b"stream-write-timeout" in trailers for trailers in reader.trailers.values())
    finally:
        reader.close()
