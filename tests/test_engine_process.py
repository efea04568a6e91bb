"""The daemon with its engine core in a process of its own (--engine-core process), end to end over real sockets:
greedy answers equal the thread mode's on both generation services (text and logprobs included), text made in the
front end from many tokens a message equals the unary and offline answers' (in both modes), a cancelled or
aborted request gives every KV block back, the metrics count the tokens the core made, and a core killed mid-stream
ends every call in flight INTERNAL (a KV-events subscription too), turns readiness NOT_SERVING and leaves no
process behind. A drained daemon stops its core (the module daemon must exit 0). What a core process cannot serve
is refused at start."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpb_grpc

from scheduler import LLM, SamplingParams
from server.proto.beastserve.v1 import generate_pb2 as pb
from server.proto.beastserve.v1 import generate_pb2_grpc as pb_grpc
from tests.daemon import Daemon
from tests.test_server import wait_pool_idle

PROMPTS = ["The quick brown fox", "Once upon a time", "Numbers: 1 2 3"]
STREAM_INTERVAL = 4


@pytest.fixture(scope="module", autouse=True)
def daemons(tiny_text_model_dir, tmp_path_factory):
    """Two daemons in process mode, loading at once: one serves the tests (several tokens a message), the other's core
    is killed."""
    started = [Daemon(tiny_text_model_dir[0], "--engine-core", "process", *flags,
                      log_path=tmp_path_factory.mktemp("log") / "daemon.log")
               for flags in (["--stream-interval", str(STREAM_INTERVAL)], [])]
    yield started
    for daemon in started:
        daemon.close()


@pytest.fixture(scope="module")
def daemon(daemons):
    """At teardown it drains and exits 0, and its core is gone with it."""
    served = daemons[0].wait_ready()
    pid = core_pid(served)
    yield served
    assert served.close() == 0
    assert not Path(f"/proc/{pid}").exists()


def core_pid(daemon: Daemon) -> int:
    """The daemon's engine core: a child of the daemon, as its log names it."""
    (pid,) = re.findall(r"engine core running in process (\d+)", daemon.log())
    assert pid in Path(f"/proc/{daemon.proc.pid}/task/{daemon.proc.pid}/children").read_text().split()
    return int(pid)


def stream_request(prompt: str, max_tokens: int = 12, **stopping) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=prompt, sampling=pb.SamplingParams(temperature=0),
                              output=pb.OutputOptions(logprobs=2),
                              stopping=pb.StoppingCriteria(max_tokens=max_tokens, **stopping))


def streamed(daemon: Daemon, prompt: str) -> tuple:
    """(token ids, text, chosen logprobs, finish reason) of a greedy GenerateStream."""
    with daemon.channel() as channel:
        messages = list(pb_grpc.GenerationStub(channel).GenerateStream(stream_request(prompt), timeout=30))
    tokens = [t for m in messages for t in m.token_ids]
    logprobs = [round(lp.logprob, 4) for m in messages for lp in m.logprobs]
    return tokens, "".join(m.text for m in messages), logprobs, messages[-1].finish_reason


def vllm_generated(daemon: Daemon, token_ids: list[int]) -> list[int]:
    request = vpb.GenerateRequest(request_id=f"v{len(token_ids)}", tokenized=vpb.TokenizedInput(input_ids=token_ids),
                                  stream=True, sampling_params=vpb.SamplingParams(temperature=0, max_tokens=12))
    with daemon.channel() as channel:
        responses = list(vpb_grpc.VllmEngineStub(channel).Generate(request, timeout=30))
    assert responses[-1].HasField("complete")
    return [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]


def test_greedy_answers_equal_the_thread_mode_on_both_services(daemon, tiny_text_daemon):
    for prompt in PROMPTS:
        ours = streamed(daemon, prompt)
        assert ours == streamed(tiny_text_daemon, prompt)
        assert len(ours[0]) == len(ours[2]) > 0 and ours[1]
    for ids in ([5, 6, 7, 8], [100, 200, 300]):
        assert vllm_generated(daemon, ids) == vllm_generated(tiny_text_daemon, ids)


TEXT_PROMPT = "Emoji 😀, 日本語 and café:"
TEXT_TOKENS = 40


def test_streamed_text_made_in_the_front_end_equals_the_unary_and_offline_answers(daemon, tiny_text_daemon,
                                                                                 tiny_text_model_dir):
    """Text made by each call from the tokens it takes (in the front end, several tokens a message with
    --stream-interval; thread mode: the module daemon's one a message) equals the unary answer's, LLM.generate's
    and the engine's own text made token by token, held-back bytes included."""
    llm = LLM(str(tiny_text_model_dir[0]))
    prompt = llm.tokenizer.encode(TEXT_PROMPT)
    params = SamplingParams(temperature=0, max_tokens=TEXT_TOKENS, ignore_eos=True)
    (offline,) = llm.generate([prompt], params)
    llm.engine.add_request(None, params, request_id="engine-made", prompt_token_ids=prompt, detokenize=True)
    deltas = [output for _ in range(TEXT_TOKENS + 2) for output in llm.engine.step()]
    assert deltas[-1].finished and offline.text == "".join(d.text for d in deltas)
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(temperature=0),
                                 stopping=pb.StoppingCriteria(max_tokens=TEXT_TOKENS, ignore_eos=True))
    for served in (daemon, tiny_text_daemon):
        with served.channel() as channel:
            stub = pb_grpc.GenerationStub(channel)
            streamed = list(stub.GenerateStream(request, timeout=30))
            unary = stub.Generate(request, timeout=30)
        if served is daemon:
            assert len(streamed) <= 2 + TEXT_TOKENS // STREAM_INTERVAL, [len(r.token_ids) for r in streamed]
        assert [t for r in streamed for t in r.token_ids] == list(unary.token_ids) == offline.token_ids
        assert "".join(r.text for r in streamed) == unary.text == offline.text
        assert streamed[-1].held_back_bytes == unary.held_back_bytes == offline.held_back_bytes \
            == deltas[-1].held_back_bytes


def test_cancelled_and_aborted_requests_give_every_block_back(daemon):
    with daemon.channel() as channel:
        stub = pb_grpc.GenerationStub(channel)
        calls = [stub.GenerateStream(stream_request(f"cancel me {i}", 400, ignore_eos=True)) for i in range(3)]
        aborted = stub.GenerateStream(pb.GenerateRequest(request_id="to-abort", text="go", stopping=pb.StoppingCriteria(
            max_tokens=400, ignore_eos=True)))
        for call in [*calls, aborted]:
            next(call)  # tokens are flowing
        load = stub.GetLoad(pb.GetLoadRequest())
        assert load.kv_blocks_free < load.kv_blocks_total and load.num_running == 4
        for call in calls:
            call.cancel()
        assert list(stub.Abort(pb.AbortRequest(request_ids=["to-abort", "unknown"])).aborted_ids) == ["to-abort"]
        assert list(aborted)[-1].finish_reason == pb.FINISH_REASON_ABORT
        for call in calls:
            with pytest.raises(grpc.RpcError) as err:
                list(call)
            assert err.value.code() == grpc.StatusCode.CANCELLED
        wait_pool_idle(stub)


def test_metrics_count_the_tokens_the_core_made(daemon):
    before = _generation_tokens(daemon)
    tokens, *_ = streamed(daemon, "count these")
    deadline = time.monotonic() + 5
    while _generation_tokens(daemon) < before + len(tokens):
        assert time.monotonic() < deadline, (before, len(tokens), _generation_tokens(daemon))
        time.sleep(0.05)


def _generation_tokens(daemon: Daemon) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    (line,) = [x for x in text.splitlines() if x.startswith("beastserve_generation_tokens_total{")]
    return float(line.rsplit(" ", 1)[1])


def test_a_killed_core_ends_calls_in_flight_and_readiness(daemons):
    daemon = daemons[1].wait_ready()
    pid = core_pid(daemon)
    with daemon.channel() as channel:
        stub = pb_grpc.GenerationStub(channel)
        calls = [stub.GenerateStream(stream_request(f"long {i}", 400, ignore_eos=True), timeout=30) for i in range(2)]
        kv_events = vpb_grpc.VllmEngineStub(channel).SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(),
                                                                       timeout=30)
        for call in [*calls, kv_events]:
            next(call)
        os.kill(pid, signal.SIGKILL)
        for call in [*calls, kv_events]:
            with pytest.raises(grpc.RpcError) as err:
                list(call)
            assert err.value.code() == grpc.StatusCode.INTERNAL, err.value
    assert not Path(f"/proc/{pid}").exists()  # reaped: no zombie
    assert _not_serving_or_gone(daemon)
    assert daemon.proc.wait(timeout=30) == 1  # the watchdog's exit, for the orchestrator to restart it
    assert "engine core process died" in daemon.log()


def _not_serving_or_gone(daemon: Daemon, timeout: float = 5) -> bool:
    """Readiness turns NOT_SERVING (the watchdog looks every 0.5 s) until the daemon has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if daemon.health() == "NOT_SERVING":
                return True
        except grpc.RpcError:  # stopping, or stopped
            return daemon.proc.wait(timeout=30) is not None
        time.sleep(0.05)
    return False


def test_what_a_core_process_cannot_serve_is_refused_at_start_naming_the_flag():
    from tests.test_config import parse

    assert parse(["--engine-core", "process"]).engine_core == "process"
    assert parse([]).engine_core == "thread"
    with pytest.raises(ValueError, match="--engine-core process does not serve tensor parallelism"):
        parse(["--engine-core", "process", "--tensor-parallel-size", "2"])
    with pytest.raises(SystemExit):  # argparse's choices
        parse(["--engine-core", "fork"])
