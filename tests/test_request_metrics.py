"""The request metrics' one rule: they count generation requests, each once. Not the start-up warm-up, not
Tokenize, GetLoad or any other call (answered or refused while the model loads). Beside the prefill computed,
the prompt tokens received. And /metrics listens on the gRPC host only."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpb_grpc

from server.proto.beastserve.v1 import generate_pb2 as pb
from server.proto.beastserve.v1 import generate_pb2_grpc as pb_grpc
from tests.daemon import Daemon
from tests.test_server import sample, scrape

REQUEST_METRICS = ("beastserve_request_success_total", "beastserve_request_failure_total",
                   "beastserve_e2e_request_latency_seconds_count", "beastserve_prompt_tokens_received_total")
FAILURES = "beastserve_request_failure_total"


def _calls_while_loading(daemon: Daemon) -> int:
    """Ask GetLoad (both services) and GetModelInfo until the model is loaded; how many were refused."""
    refused = 0
    with daemon.channel() as channel:
        ours, theirs = pb_grpc.GenerationStub(channel), vpb_grpc.VllmEngineStub(channel)
        while daemon.proc.poll() is None:
            try:
                ours.GetLoad(pb.GetLoadRequest(), timeout=2)
                return refused
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or "loading" not in (exc.details() or ""):
                    continue  # the port is not open yet
            for call in (lambda: theirs.GetLoads(vpb.GetLoadsRequest(), timeout=2),
                         lambda: ours.GetModelInfo(pb.GetModelInfoRequest(), timeout=2)):
                try:
                    call()
                except grpc.RpcError:
                    pass
            refused += 1
    raise RuntimeError(daemon.log())


@pytest.fixture(scope="module")
def started(tiny_text_model_dir, tmp_path_factory):
    """A daemon, the number of GetLoad calls refused while it loaded, and its metrics when it became ready."""
    daemon = Daemon(tiny_text_model_dir[0], log_path=tmp_path_factory.mktemp("log") / "daemon.log")
    try:
        refused = _calls_while_loading(daemon)
        daemon.wait_ready()
        yield daemon, refused, scrape(daemon)
    finally:
        assert daemon.close() == 0


@pytest.fixture(scope="module")
def stub(started):
    with started[0].channel() as channel:
        yield pb_grpc.GenerationStub(channel)


def test_the_warm_up_is_no_request(started):
    _, _, fresh = started
    for name in (*REQUEST_METRICS, "beastserve_generation_tokens_total", "beastserve_prompt_tokens_total",
                 "beastserve_iteration_tokens_count", "beastserve_time_to_first_token_seconds_count"):
        assert sample(fresh, name) == 0, name


def test_calls_other_than_generation_are_never_counted(started, stub):
    daemon, refused, fresh = started
    assert refused >= 1  # the daemon was asked while loading ...
    assert sample(fresh, FAILURES) == 0  # ... and counted none of it
    with pytest.raises(grpc.RpcError) as caught:
        stub.Tokenize(pb.TokenizeRequest(), timeout=10)  # neither text nor chat
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with daemon.channel() as channel, pytest.raises(grpc.RpcError) as caught:  # a message that does not parse
        channel.unary_unary("/beastserve.v1.Generation/Tokenize")(b"\xff\xfe not a protobuf message", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stub.GetLoad(pb.GetLoadRequest(), timeout=10)
    assert sample(scrape(daemon), FAILURES) == 0
    with pytest.raises(grpc.RpcError) as caught:  # a generation request refused is counted, once
        stub.Generate(pb.GenerateRequest(text="x", sampling=pb.SamplingParams(top_p=7)), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sample(scrape(daemon), FAILURES) == 1 == sample(scrape(daemon), FAILURES, 'code="INVALID_ARGUMENT"')


def test_prompt_tokens_received_beside_those_computed(started, stub):
    daemon = started[0]
    received, computed = "beastserve_prompt_tokens_received_total", "beastserve_prompt_tokens_total"
    before = scrape(daemon)
    prompt = pb.TokenIds(ids=list(range(100, 140)))  # 40 tokens: two full blocks of 16, then 8
    once = pb.GenerateRequest(token_ids=prompt, stopping=pb.StoppingCriteria(max_tokens=2, ignore_eos=True))
    assert stub.Generate(once, timeout=30).usage.prompt_tokens == 40
    assert stub.Generate(once, timeout=30).usage.prompt_tokens == 40  # its first 32 from the prefix cache
    middle = scrape(daemon)
    assert sample(middle, received) - sample(before, received) == 40 + 40
    assert sample(middle, computed) - sample(before, computed) == 40 + 8
    truncated = pb.GenerateRequest(token_ids=prompt, truncate_prompt_tokens=10, sampling=pb.SamplingParams(n=2),
                                   stopping=pb.StoppingCriteria(max_tokens=2, ignore_eos=True))
    stub.Generate(truncated, timeout=30)  # 10 tokens received, once for its 2 completions
    after = scrape(daemon)
    assert sample(after, received) - sample(middle, received) == 10
    assert sample(after, "beastserve_request_success_total") - sample(before, "beastserve_request_success_total") == 3


def test_metrics_listen_on_the_grpc_host_only(started):
    daemon = started[0]
    assert urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=5).status == 200
    with pytest.raises(OSError):  # another loopback address of this machine: nothing listens there
        urllib.request.urlopen(f"http://127.0.0.2:{daemon.metrics_port}/metrics", timeout=5)
