"""No client stalls the event loop: a schema nested 400 levels and a 15 MB prompt are refused on both protocols
(INVALID_ARGUMENT naming the field) before any work that grows with them, while a liveness probe keeps answering
within a second; work that is admitted but heavy (a long prompt, a reasonably deep schema) runs off the loop."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpb_grpc

from server.proto.beastserve.v1 import generate_pb2 as pb
from server.proto.beastserve.v1 import generate_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def daemon(tiny_text_daemon):
    return tiny_text_daemon


def nested_schema(depth: int) -> str:
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return json.dumps(schema)


class Probe:
    """Liveness checks back to back, as an orchestrator's probe with a 2 s timeout; the slowest one's latency."""

    def __init__(self, daemon):
        self.daemon, self.latencies, self.stop = daemon, [], threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                self.daemon.health("")
            except grpc.RpcError:  # its 2 s timeout
                pass
            self.latencies.append(time.monotonic() - start)
            time.sleep(0.02)

    def __enter__(self) -> Probe:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def refusal(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def test_liveness_answers_within_a_second_while_a_deep_schema_and_a_huge_prompt_are_refused(daemon):
    huge = "All work and no play makes Jack a dull boy. " * 350_000  # 15 MB
    deep = nested_schema(400)  # 22 KB
    with daemon.channel(options=[("grpc.max_send_message_length", 32 << 20)]) as channel:
        generation, engine = pb_grpc.GenerationStub(channel), vpb_grpc.VllmEngineStub(channel)
        calls = {
            "text": lambda: generation.Generate(pb.GenerateRequest(text=huge), timeout=60),
            "structured_outputs.json": lambda: generation.Generate(pb.GenerateRequest(
                text="Answer:", structured_outputs=pb.StructuredOutputs(json=deep)), timeout=60),
            "gateway text": lambda: list(engine.Generate(vpb.GenerateRequest(
                text=huge, sampling_params=vpb.SamplingParams(max_tokens=4)), timeout=60)),
            "sampling_params.json_schema": lambda: list(engine.Generate(vpb.GenerateRequest(
                tokenized=vpb.TokenizedInput(input_ids=[5, 6, 7]),
                sampling_params=vpb.SamplingParams(max_tokens=4, json_schema=deep)), timeout=60)),
        }
        with Probe(daemon) as probe, ThreadPoolExecutor(len(calls)) as pool:
            time.sleep(0.2)
            outcomes = dict(zip(calls, pool.map(refusal, calls.values())))
            time.sleep(0.2)
    for name, (code, details) in outcomes.items():
        field = name.removeprefix("gateway ")
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(f"{field}: "), (name, details)
    assert len(probe.latencies) >= 5 and max(probe.latencies) < 1.0, sorted(probe.latencies)[-3:]


def test_heavy_work_that_is_admitted_runs_off_the_loop(daemon):
    """A prompt too long for the model (32 KB, under the byte bound) is tokenised in a thread, then refused for its
    tokens; a schema 32 objects deep compiles and is served."""
    long_text = "word " * 6500
    with daemon.channel() as channel, Probe(daemon) as probe:
        generation = pb_grpc.GenerationStub(channel)
        code, details = refusal(lambda: generation.Generate(pb.GenerateRequest(text=long_text), timeout=60))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "tokens; max_model_len is" in details, details
        response = generation.Generate(pb.GenerateRequest(
            text="Answer:", structured_outputs=pb.StructuredOutputs(json=nested_schema(32)),
            stopping=pb.StoppingCriteria(max_tokens=8)), timeout=60)
        assert response.text.startswith('{"a":')
    assert max(probe.latencies) < 1.0
