"""Hostile input on both protocols ends INVALID_ARGUMENT naming the field, never UNKNOWN: messages that do not
parse (garbage, truncated, invalid UTF-8 in a string field), JSON nested past any schema's need, a grammar no
string satisfies, more stop strings than the one limit allows. Each refusal of a generation call is counted in
request_failure_total{code="INVALID_ARGUMENT"}, and the log holds one line per malformed message, no traceback."""

from __future__ import annotations

import re

import grpc
import pytest
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpb_grpc

from scheduler.core.params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from server.proto.beastserve.v1 import generate_pb2 as pb
from server.proto.beastserve.v1 import generate_pb2_grpc as pb_grpc
from tests.test_server import sample, scrape

V1 = "/beastserve.v1.Generation/"
GATEWAY = "/vllm.grpc.engine.VllmEngine/"
UNSATISFIABLE = 'root ::= x\nx ::= x "a"'
DEEP_JSON = "[" * 900 + "]" * 900


@pytest.fixture(scope="module")
def channel(tiny_text_daemon):
    with tiny_text_daemon.channel() as channel:
        yield channel


def invalid_utf8(message, good: bytes) -> bytes:
    """The message with one string field's bytes (`good`, found once) made invalid UTF-8."""
    data = message.SerializeToString()
    assert data.count(good) == 1
    return data.replace(good, good[:-1] + b"\xff")


MALFORMED = [  # (method, bytes sent, the field the refusal names)
    (V1 + "Generate", b"\xff\xfe not a protobuf message", "request"),
    (V1 + "GenerateStream", pb.GenerateRequest(request_id="r", text="hello there").SerializeToString()[:-3], "text"),
    (V1 + "Generate", invalid_utf8(pb.GenerateRequest(text="hello"), b"hello"), "text"),
    (V1 + "GenerateStream", invalid_utf8(pb.GenerateRequest(text="hi", stopping=pb.StoppingCriteria(stop=["zz"])),
                                         b"zz"), "stopping.stop"),
    (GATEWAY + "Generate", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", "request_id"),
    (GATEWAY + "Generate", vpb.GenerateRequest(text="hello there").SerializeToString()[:-2], "text"),
    (GATEWAY + "Generate", invalid_utf8(vpb.GenerateRequest(text="hello"), b"hello"), "text"),
    (GATEWAY + "Generate", invalid_utf8(vpb.GenerateRequest(text="hi", sampling_params=vpb.SamplingParams(
        stop=["zz"])), b"zz"), "sampling_params.stop"),
]


def refusal(call) -> tuple[grpc.StatusCode, str]:
    try:
        result = call()
        if not hasattr(result, "SerializeToString"):
            list(result)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def raw(channel, method: str, data: bytes):
    if method.endswith("Generate") and method.startswith(V1):
        return lambda: channel.unary_unary(method)(data, timeout=30)
    return lambda: channel.unary_stream(method)(data, timeout=30)


def v1(**fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(**{"text": "Answer:", "stopping": pb.StoppingCriteria(max_tokens=2), **fields})


def gateway(**sampling) -> vpb.GenerateRequest:
    return vpb.GenerateRequest(tokenized=vpb.TokenizedInput(input_ids=[5, 6, 7]),
                               sampling_params=vpb.SamplingParams(max_tokens=2, **sampling))


def refused_values(channel) -> list[tuple[str, object, str]]:
    """(protocol, request, field named): parsed messages whose values are refused."""
    many, long = ["s"] * (MAX_STOP_STRINGS + 1), ["s" * (MAX_STOP_STRING_CHARS + 1)]
    return [
        ("v1", v1(structured_outputs=pb.StructuredOutputs(json=DEEP_JSON)), "structured_outputs.json"),
        ("v1", v1(structured_outputs=pb.StructuredOutputs(json="[" * 100_000)), "structured_outputs.json"),
        ("v1", v1(structured_outputs=pb.StructuredOutputs(structural_tag=DEEP_JSON)),
         "structured_outputs.structural_tag"),
        ("v1", v1(structured_outputs=pb.StructuredOutputs(grammar=UNSATISFIABLE)), "structured_outputs.grammar"),
        ("v1", v1(stopping=pb.StoppingCriteria(max_tokens=2, stop=many)), "stopping.stop"),
        ("v1", v1(stopping=pb.StoppingCriteria(max_tokens=2, stop=long)), "stopping.stop"),
        ("gateway", gateway(json_schema=DEEP_JSON), "sampling_params.json_schema"),
        ("gateway", gateway(structural_tag=DEEP_JSON), "sampling_params.structural_tag"),
        ("gateway", gateway(grammar=UNSATISFIABLE), "sampling_params.grammar"),
        ("gateway", gateway(stop=many), "sampling_params.stop"),
        ("gateway", gateway(stop=long), "sampling_params.stop"),
    ]


def failures(daemon) -> float:
    return sample(scrape(daemon), "beastserve_request_failure_total", 'code="INVALID_ARGUMENT"')


def test_hostile_input_is_invalid_argument_naming_the_field_counted_and_logged_in_one_line(tiny_text_daemon, channel):
    before, logged = failures(tiny_text_daemon), len(tiny_text_daemon.log())
    generation, engine = pb_grpc.GenerationStub(channel), vpb_grpc.VllmEngineStub(channel)
    outcomes = [(method, field, refusal(raw(channel, method, data))) for method, data, field in MALFORMED]
    for protocol, request, field in refused_values(channel):
        call = (lambda r=request: generation.Generate(r, timeout=30)) if protocol == "v1" else \
            (lambda r=request: engine.Generate(r, timeout=30))
        outcomes.append((protocol, field, refusal(call)))
    for what, field, (code, details) in outcomes:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(f"{field}: "), (what, code, details)
    assert failures(tiny_text_daemon) - before == len(outcomes)
    log = tiny_text_daemon.log()[logged:]
    assert "Traceback" not in log and "Unexpected" not in log
    refused = [line for line in log.splitlines() if re.search(r"/Generate(Stream)? refused: ", line)]
    assert len(refused) == len(MALFORMED)


def test_the_one_stop_string_limit_is_served_in_full_on_both_protocols(channel):
    stops = [chr(0x4E00 + i) * MAX_STOP_STRING_CHARS for i in range(MAX_STOP_STRINGS)]  # never generated here
    answer = pb_grpc.GenerationStub(channel).Generate(v1(stopping=pb.StoppingCriteria(max_tokens=2, stop=stops)))
    assert answer.usage.completion_tokens == 2
    (complete,) = [r.complete for r in vpb_grpc.VllmEngineStub(channel).Generate(gateway(stop=stops))]
    assert complete.completion_tokens == 2
