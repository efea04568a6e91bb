"""Every GenerateRequest field fuzzed against one live daemon: whatever arrives, the call either
answers in full or fails with INVALID_ARGUMENT / RESOURCE_EXHAUSTED and a message — never INTERNAL,
UNKNOWN or a hang — and the daemon keeps serving with its block pool intact (invariants 4 and 5)."""

from __future__ import annotations

import random

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from server.proto.beastserve.v1 import generate_pb2 as pb
from tests.daemon import generation_stub, serve_for_module
from tests.test_server import wait_pool_idle

MAX_MESSAGE_BYTES = 65536
VOCAB = 49152  # tiny_text_model_dir has the default model's tokenizer
MAX_TOKENS_CAP = 6  # keeps every accepted request short
TIMEOUT = 20  # a hang fails as DEADLINE_EXCEEDED
REFUSALS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
UINT32, INT32, INT64 = (0, 2**32 - 1), (-(2**31), 2**31 - 1), (-(2**63), 2**63 - 1)
# The top-level request fields an INVALID_ARGUMENT message may name.
FIELDS = ("request_id", "input", "text", "token_ids", "chat", "sampling", "stopping", "output", "priority",
          "speculative", "prompt")


@pytest.fixture(scope="module")
def daemon(tiny_text_model_dir, tmp_path_factory):
    path, _ = tiny_text_model_dir
    yield from serve_for_module(path, tmp_path_factory, "--max-message-bytes", str(MAX_MESSAGE_BYTES),
                                "--kv-cache-bytes", str(64 << 20))


@pytest.fixture(scope="module")
def stub(daemon):
    yield from generation_stub(daemon)


GREEDY = pb.GenerateRequest(text="After the storm", sampling=pb.SamplingParams(temperature=0),
                            stopping=pb.StoppingCriteria(max_tokens=8, ignore_eos=True))


@pytest.fixture(scope="module")
def reference(stub) -> pb.GenerateResponse:
    """A greedy answer taken before any fuzzing."""
    return stub.Generate(GREEDY, timeout=TIMEOUT)


def floats():
    """Proto floats: anything a float32 holds, NaN and the infinities included, plus the edges of each range."""
    edges = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 1e-45, 3.4e38, -3.4e38, 0.5])
    return st.one_of(edges, st.floats(width=32, allow_nan=True, allow_infinity=True))


def ints(bounds: tuple[int, int]):
    low, high = bounds
    return st.one_of(st.sampled_from([low, high, 0, 1, -1 if low < 0 else 2]), st.integers(low, high))


def optional(strategy):
    return st.one_of(st.none(), strategy)


def large_token_ids():
    """10k-id lists drawn by a seed (hypothesis draws long lists element by element, far too slowly)."""
    return st.integers(0, 2**16).map(lambda seed: [random.Random(seed).randrange(VOCAB) for _ in range(10_000)])


def text(min_size: int = 0, max_size: int = 100):
    """Random unicode, plus a few strings tokenizers and templates treat specially."""
    return st.one_of(st.text(min_size=min_size, max_size=max_size),
                     st.sampled_from(["Hello", " ", "\x00", "<|im_end|>", "{{ raise }}", "\u202e", "🦀" * 50]))


ROLES = ["system", "user", "assistant", "tool"]
# Each field: what a well-behaved client sends, and the wild values a fuzzer sends.
VALID = {
    "text": text(min_size=1),
    "token_ids": st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=24),
    "chat": st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(ROLES), content=text()), min_size=1,
                     max_size=3),
    "temperature": optional(st.floats(0, 2, width=32)),
    "top_p": optional(st.floats(0, 1, width=32, exclude_min=True)),
    "top_k": optional(st.integers(0, 100)),
    "min_p": optional(st.floats(0, 1, width=32)),
    "repetition_penalty": optional(st.floats(0.5, 2, width=32)),
    "frequency_penalty": optional(st.floats(-2, 2, width=32)),
    "presence_penalty": optional(st.floats(-2, 2, width=32)),
    "seed": optional(ints(INT64)),
    "max_tokens": st.integers(1, MAX_TOKENS_CAP),
    "min_tokens": st.integers(0, 1),
    "stop": st.lists(text(min_size=1, max_size=6), max_size=4),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=4),
    "logprobs": st.integers(0, 20),
    "priority": ints(INT32),
    "max_draft_tokens": optional(st.integers(0, 8)),
}
WILD = {
    "text": st.one_of(text(), st.integers(1, 50_000).map(lambda n: "word " * (n // 5)),
                      st.just("x" * (MAX_MESSAGE_BYTES + 1000))),  # over --max-message-bytes
    "token_ids": st.one_of(st.lists(ints(UINT32), max_size=24), large_token_ids()),
    "chat": st.lists(st.builds(pb.ChatMessage, role=st.one_of(st.sampled_from(ROLES), st.text(max_size=12)),
                               content=text()), max_size=4),
    "temperature": floats(), "top_p": floats(), "min_p": floats(), "repetition_penalty": floats(),
    "frequency_penalty": floats(), "presence_penalty": floats(),
    "top_k": ints(INT32),
    "seed": ints(INT64),
    "max_tokens": st.one_of(st.just(0), st.integers(512, UINT32[1])),
    "min_tokens": ints(UINT32),
    "stop": st.one_of(st.lists(st.text(max_size=8), max_size=6), st.just(["z" * 600]),
                      st.integers(1000, 5000).map(lambda n: [f"s{i}" for i in range(n)])),
    "stop_token_ids": st.lists(ints(UINT32), max_size=6),
    "logprobs": ints(UINT32),
    "priority": ints(INT32),
    "max_draft_tokens": ints(UINT32),
}
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty",
            "seed")


@st.composite
def requests(draw) -> pb.GenerateRequest:
    """Well-formed but for up to two wild fields, so requests get past the first check and often run."""
    num_wild = draw(st.sampled_from([0, 1, 1, 2]))
    wild = draw(st.sets(st.sampled_from(sorted(WILD) + ["input"]), min_size=num_wild, max_size=num_wild))

    def value(name):
        return draw(WILD[name] if name in wild else VALID[name])

    request = pb.GenerateRequest(request_id=draw(st.one_of(st.just(""), st.text(max_size=40))))
    kind = draw(st.sampled_from(["text", "token_ids", "chat"] + (["none"] if "input" in wild else [])))
    if kind == "text":
        request.text = value("text")
    elif kind == "token_ids":
        request.token_ids.ids.extend(value("token_ids"))
    elif kind == "chat":
        request.chat.messages.extend(value("chat"))
    for name in SAMPLING:
        if (v := value(name)) is not None:
            setattr(request.sampling, name, v)
    stopping = request.stopping
    stopping.max_tokens = value("max_tokens")  # small when valid; never unset, which runs to max_model_len
    stopping.min_tokens = value("min_tokens")
    stopping.stop.extend(value("stop"))
    stopping.stop_token_ids.extend(value("stop_token_ids"))
    stopping.ignore_eos = draw(st.booleans())
    stopping.include_stop_str_in_output = draw(st.booleans())
    request.output.logprobs = value("logprobs")
    if (skip := draw(optional(st.booleans()))) is not None:
        request.output.skip_special_tokens = skip
    request.priority = value("priority")
    if (enabled := draw(optional(st.booleans()))) is not None:
        request.speculative.enabled = enabled
    if (depth := value("max_draft_tokens")) is not None:
        request.speculative.max_draft_tokens = depth
    return request


def call(stub, request: pb.GenerateRequest, stream: bool) -> tuple[grpc.StatusCode, str, list[pb.GenerateResponse]]:
    try:
        if stream:
            return grpc.StatusCode.OK, "", list(stub.GenerateStream(request, timeout=TIMEOUT))
        return grpc.StatusCode.OK, "", [stub.Generate(request, timeout=TIMEOUT)]
    except grpc.RpcError as err:
        return err.code(), err.details() or "", []


def assert_complete(request: pb.GenerateRequest, responses: list[pb.GenerateResponse]) -> None:
    last = responses[-1]
    assert last.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    assert last.HasField("usage") and last.HasField("timing")
    num_tokens = sum(len(r.token_ids) for r in responses)
    assert last.usage.completion_tokens == num_tokens <= request.stopping.max_tokens
    assert last.usage.prompt_tokens > 0
    if request.request_id:
        assert all(r.request_id == request.request_id for r in responses)
    matched = last.WhichOneof("matched_stop")
    if matched == "stop_string":
        assert last.stop_string in request.stopping.stop
    elif matched == "stop_token_id":
        assert last.stop_token_id in request.stopping.stop_token_ids
    assert (matched is not None) == (last.finish_reason == pb.FINISH_REASON_STOP)
    logprobs = [lp for r in responses for lp in r.logprobs]
    if request.output.logprobs:
        assert len(logprobs) == num_tokens and all(len(lp.top) == request.output.logprobs for lp in logprobs)
    else:
        assert not logprobs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=requests(), stream=st.booleans())
def test_any_request_is_answered_in_full_or_refused_with_a_reason(stub, reference, request, stream):
    code, details, responses = call(stub, request, stream)
    event(code.name if code != grpc.StatusCode.INVALID_ARGUMENT else details.split(":")[0][:40])
    if code == grpc.StatusCode.OK:
        assert_complete(request, responses)
        return
    assert code in REFUSALS, (code, details)
    assert details.strip(), code
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert any(name in details for name in FIELDS), details


def test_a_message_over_the_limit_is_resource_exhausted(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(text="x" * (MAX_MESSAGE_BYTES + 1)), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.details()


def test_the_daemon_still_serves_after_the_fuzzing(daemon, stub, reference):
    """Runs after the fuzz test (file order): greedy output as before it, the pool whole, readiness on."""
    again = stub.Generate(GREEDY, timeout=TIMEOUT)
    assert len(again.token_ids) == 8 and again.token_ids == reference.token_ids and again.text == reference.text
    wait_pool_idle(stub)
    assert daemon.health() == "SERVING"
