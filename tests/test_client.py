"""The clients and the client commands speak the proto contract: against an in-process fake daemon that
echoes, requests carry exactly what was given, streams arrive in order, and the API key travels as metadata."""

from __future__ import annotations

import argparse
import asyncio
import io
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server.cli_client import add_client_commands
from server.client import READINESS_SERVICE, AsyncClient, Client, build_request
from server.proto.beastserve.v1 import generate_pb2 as pb
from server.proto.beastserve.v1 import generate_pb2_grpc


def _prompt_text(request: pb.GenerateRequest) -> str:
    kind = request.WhichOneof("input")
    if kind == "chat":
        return request.chat.messages[-1].content
    return request.text if kind == "text" else " ".join(map(str, request.token_ids.ids))


class EchoGeneration(generate_pb2_grpc.GenerationServicer):
    """Answers with the prompt (for chat: the last message), one word per streamed delta."""

    def __init__(self):
        self.requests: list[pb.GenerateRequest] = []
        self.metadata: list[dict] = []

    def _record(self, request, context):
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))

    def _last(self, request, words: int) -> pb.GenerateResponse:
        return pb.GenerateResponse(request_id=request.request_id, finish_reason=pb.FINISH_REASON_LENGTH,
                                   usage=pb.Usage(prompt_tokens=7, completion_tokens=words, cached_tokens=2),
                                   timing=pb.Timing(ttft_s=0.0125, e2e_s=0.25))

    def Generate(self, request, context):
        self._record(request, context)
        if _prompt_text(request) == "fail":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "stopping.max_tokens: must be >= 1, got 0")
        response = self._last(request, 1)
        response.text = _prompt_text(request)
        return response

    def GenerateStream(self, request, context):
        self._record(request, context)
        if _prompt_text(request) == "fail":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full")
        words = _prompt_text(request).split(" ")
        for i, word in enumerate(words):
            if i == 1 and words[0] == "slow":
                time.sleep(2)
            if i == len(words) - 1 and word.endswith("\ufffd"):  # a character cut by the length limit
                break
            yield pb.GenerateResponse(request_id=request.request_id, text=word if i == 0 else " " + word)
        last = self._last(request, len(words))
        if words[-1].endswith("\ufffd"):
            last.text = " " + words[-1]
        yield last

    def Abort(self, request, context):
        self._record(request, context)
        return pb.AbortResponse(aborted_ids=[i for i in request.request_ids if i.startswith("live")])

    def Tokenize(self, request, context):
        self._record(request, context)
        text = request.text if request.WhichOneof("input") == "text" else request.chat.messages[-1].content
        return pb.TokenizeResponse(token_ids=[ord(c) for c in text] + ([1] if request.add_special_tokens else []))

    def GetModelInfo(self, request, context):
        return pb.ModelInfo(model="echo", max_model_len=128)

    def GetLoad(self, request, context):
        return pb.Load(num_running=3, kv_blocks_total=10)


@pytest.fixture(scope="module")
def daemon():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = EchoGeneration()
    generate_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(READINESS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


@pytest.fixture
def client(daemon):
    with Client(daemon[0], timeout=10) as client:
        yield client


def test_request_sets_only_the_fields_given():
    request = build_request("hi")
    assert request.text == "hi"
    for section in ("sampling", "stopping", "output", "speculative"):
        assert not request.HasField(section)

    request = build_request([5, 6], temperature=0.0, max_tokens=8, stop="\n", ignore_eos=True, logprobs=2,
                            repetition_penalty=1.1, skip_special_tokens=False, speculative=False, priority=-1)
    assert list(request.token_ids.ids) == [5, 6]
    assert request.sampling.HasField("temperature") and request.sampling.temperature == 0.0  # greedy, not unset
    assert not request.sampling.HasField("top_p") and not request.sampling.HasField("seed")
    assert request.sampling.repetition_penalty == pytest.approx(1.1)
    assert request.stopping.max_tokens == 8 and list(request.stopping.stop) == ["\n"] and request.stopping.ignore_eos
    assert request.output.logprobs == 2 and request.output.HasField("skip_special_tokens")
    assert request.speculative.HasField("enabled") and not request.speculative.enabled
    assert request.priority == -1


def test_request_takes_logit_bias_prompt_logprobs_and_truncation():
    request = build_request([5, 6, 7], logit_bias={3: -100, 9: 2.5}, prompt_logprobs=0, truncate_prompt_tokens=2)
    assert dict(request.sampling.logit_bias) == {3: -100.0, 9: 2.5}
    assert request.output.HasField("prompt_logprobs") and request.output.prompt_logprobs == 0  # asked, not unset
    assert request.HasField("truncate_prompt_tokens") and request.truncate_prompt_tokens == 2
    plain = build_request([5])
    assert not plain.output.HasField("prompt_logprobs") and not plain.HasField("truncate_prompt_tokens")


@pytest.mark.parametrize("kwargs, named", [
    (dict(logit_bias={3: 101.0}), "sampling.logit_bias"), (dict(logit_bias={-3: 1.0}), "sampling.logit_bias"),
    (dict(prompt_logprobs=21), "output.prompt_logprobs"), (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
    (dict(truncate_prompt_tokens=2**40), "truncate_prompt_tokens")])
def test_request_refuses_bad_new_fields_naming_them(kwargs, named):
    with pytest.raises(ValueError, match=named):
        build_request("hi", **kwargs)


def test_request_takes_chat_and_rejects_bad_input():
    request = build_request(chat=[{"role": "user", "content": "hi"}], request_id="r1")
    assert request.WhichOneof("input") == "chat" and request.chat.messages[0].role == "user"
    assert request.request_id == "r1"
    with pytest.raises(ValueError, match="prompt or chat is required"):
        build_request()
    with pytest.raises(ValueError, match="not both"):
        build_request("hi", chat=[{"role": "user", "content": "hi"}])
    with pytest.raises(TypeError, match="tempreature"):
        build_request("hi", tempreature=0.5)


def test_generate_sends_the_request_and_the_api_key(daemon):
    address, servicer = daemon
    with Client(address, api_key="sekret") as client:
        response = client.generate("hello there", request_id="abc", top_k=5)
    assert response.text == "hello there" and response.request_id == "abc"
    assert servicer.requests[-1].sampling.top_k == 5 and not servicer.requests[-1].sampling.HasField("top_p")
    assert servicer.metadata[-1]["authorization"] == "Bearer sekret"


def test_no_api_key_sends_no_authorization(client, daemon):
    client.chat([{"role": "user", "content": "hi"}])
    assert "authorization" not in daemon[1].metadata[-1]


def test_stream_yields_deltas_then_the_summary(client):
    responses = list(client.stream("one two three", max_tokens=3))
    assert "".join(r.text for r in responses) == "one two three"
    # Finish reasons as words, the offline API's: none while streaming.
    assert [r.finish_reason for r in responses] == [None] * 3 + ["length"]
    assert responses[-1].proto.finish_reason == pb.FINISH_REASON_LENGTH
    assert responses[-1].usage.completion_tokens == 3


def test_unary_methods(client):
    assert client.tokenize("ab") == [97, 98, 1]
    assert client.tokenize(chat=[{"role": "user", "content": "c"}], add_special_tokens=False) == [99]
    assert client.abort(["live-1", "gone-2"]) == ["live-1"]
    assert client.model_info().model == "echo"
    assert client.load().num_running == 3
    assert client.health() == "SERVING"
    assert client.health(READINESS_SERVICE) == "NOT_SERVING"


def test_errors_raise_with_the_server_status(client):
    with pytest.raises(grpc.RpcError) as info:
        client.generate("fail")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_async_client_matches_the_sync_one(daemon):
    address, servicer = daemon

    async def talk():
        async with AsyncClient(address, api_key="k", timeout=10) as client:
            response = await client.generate("hi", seed=3)
            deltas = [r.text async for r in client.stream("a b")]
            return response, deltas, await client.tokenize("x"), await client.health(), await client.abort(["live"])

    response, deltas, ids, status, aborted = asyncio.run(talk())
    assert response.text == "hi" and servicer.requests[-4].sampling.seed == 3
    assert deltas == ["a", " b", ""]
    assert (ids, status, aborted) == ([120, 1], "SERVING", ["live"])
    assert servicer.metadata[-1]["authorization"] == "Bearer k"


def test_mutual_tls_needs_both_cert_and_key():
    with pytest.raises(ValueError, match="go together"):
        Client(tls_cert_file="client.pem")


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="beastserve")
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_generate_streams_text_and_summarises(daemon, capsys):
    address, servicer = daemon
    assert _run(["generate", "hi there", "--address", address, "--temperature", "0", "--stop", "x", "--stop", "y",
                 "--chat", "--api-key", "k"]) == 0
    out, err = capsys.readouterr()
    assert out == "hi there\n"
    assert "finish=length" in err and "completion_tokens=2" in err and "ttft=12.5ms" in err and "e2e=250.0ms" in err
    request = servicer.requests[-1]
    assert request.WhichOneof("input") == "chat" and list(request.stopping.stop) == ["x", "y"]
    assert request.sampling.HasField("temperature") and not request.sampling.HasField("top_p")
    assert servicer.metadata[-1]["authorization"] == "Bearer k"


def test_cli_reads_the_address_from_the_environment(daemon, monkeypatch, capsys):
    monkeypatch.setenv("BEASTSERVE_ADDRESS", daemon[0])
    assert _run(["generate", "hi"]) == 0
    assert capsys.readouterr().out == "hi\n"


def test_cli_reports_grpc_errors(daemon, capsys):
    assert _run(["generate", "fail", "--address", daemon[0]]) == 1
    assert capsys.readouterr().err == "beastserve: RESOURCE_EXHAUSTED: queue is full\n"


def test_cli_chat_keeps_the_history_and_marks_cut_answers(daemon, monkeypatch, capsys):
    address, servicer = daemon
    monkeypatch.setattr("sys.stdin", io.StringIO("first one\n\nsecond\n/exit\nnever sent\n"))
    assert _run(["chat", "--address", address, "--system", "be brief"]) == 0
    out, err = capsys.readouterr()
    assert out == "> first one [length]\n> > second [length]\n> "  # the echo daemon always ends at its length
    assert "/exit to leave, /reset to start over, /help" in err
    messages = [(m.role, m.content) for m in servicer.requests[-1].chat.messages]
    assert messages == [("system", "be brief"), ("user", "first one"), ("assistant", "first one"), ("user", "second")]


def test_cli_chat_commands_are_not_sent_to_the_model(daemon, monkeypatch, capsys):
    address, servicer = daemon
    monkeypatch.setattr("sys.stdin", io.StringIO("first\n/help\n/frobnicate\n/reset\nsecond\n/exit\n"))
    sent = len(servicer.requests)
    assert _run(["chat", "--address", address, "--system", "be brief"]) == 0
    out = capsys.readouterr().out
    assert "/reset" in out and "Ctrl-C" in out  # the help
    assert "unknown command /frobnicate; /help lists them" in out and "[new conversation]" in out
    chats = [[(m.role, m.content) for m in r.chat.messages] for r in servicer.requests[sent:] if r.HasField("chat")]
    assert chats == [[("system", "be brief"), ("user", "first")], [("system", "be brief"), ("user", "second")]]


def test_cli_chat_ctrl_c_stops_the_answer_and_keeps_the_conversation(daemon, monkeypatch, capsys):
    address, servicer = daemon
    import server.cli_client as cli_client

    real_print_stream, calls = cli_client.print_stream, []

    def interrupted_once(responses, **kw):  # Ctrl-C arrives while the second answer is being written
        calls.append(responses)
        if len(calls) == 2:
            next(iter(responses))
            raise KeyboardInterrupt
        return real_print_stream(responses, **kw)

    monkeypatch.setattr(cli_client, "print_stream", interrupted_once)
    monkeypatch.setattr("sys.stdin", io.StringIO("one\ntwo\nthree\n"))
    assert _run(["chat", "--address", address]) == 0
    assert "[stopped; not kept in the conversation]" in capsys.readouterr().out
    assert calls[1].code() == grpc.StatusCode.CANCELLED  # the call was cancelled, so the daemon aborts it
    messages = [(m.role, m.content) for m in servicer.requests[-1].chat.messages]
    assert messages == [("user", "one"), ("assistant", "one"), ("user", "three")]


def test_cli_an_error_mid_stream_starts_on_its_own_line(daemon, capsys):
    assert _run(["generate", "slow answer", "--address", daemon[0], "--timeout", "0.5"]) == 1
    out, err = capsys.readouterr()
    assert out == "slow\n" and err.startswith("beastserve: DEADLINE_EXCEEDED")


def test_a_replacement_character_in_the_text_is_printed_as_it_is(daemon, capsys):
    # The engine holds half characters back (held_back_bytes): a U+FFFD that arrives is one the model wrote.
    assert _run(["generate", "rainbow \U0001f308\ufffd", "--address", daemon[0]]) == 0
    assert capsys.readouterr().out == "rainbow \U0001f308\ufffd\n"


def test_cli_chat_ends_at_end_of_input(daemon, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert _run(["chat", "--address", daemon[0]]) == 0


def test_cli_health_checks_readiness_unless_asked_for_liveness(daemon, capsys):
    assert _run(["health", "--address", daemon[0]]) == 1
    assert _run(["health", "--address", daemon[0], "--live"]) == 0
    assert _run(["health", "--address", daemon[0], "--service", ""]) == 0
    assert _run(["health", "--address", daemon[0], "--service", READINESS_SERVICE, "--wait", "0.6"]) == 1
    assert capsys.readouterr().out == "NOT_SERVING\nSERVING\nSERVING\nNOT_SERVING\n"
    assert _run(["health", "--address", daemon[0], "--service", "nope"]) == 1
    assert capsys.readouterr().err.startswith("beastserve: NOT_FOUND:")
