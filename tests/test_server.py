"""The daemon end to end over real sockets: outputs, concurrency, cancellation, validation,
health, reflection and metrics."""

from __future__ import annotations

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from scheduler import LLM, SamplingParams
from server.proto.beastserve.v1 import generate_pb2 as pb
from tests.daemon import generation_stub, serve_for_module

PROMPTS = ["The quick brown fox", "Once upon a time", "Numbers: 1 2 3", "Hello", "A list of fruits:"]


@pytest.fixture(scope="module")
def daemon(tiny_text_model_dir, tmp_path_factory):
    path, _ = tiny_text_model_dir
    yield from serve_for_module(path, tmp_path_factory, "--max-num-batched-tokens", "256")


@pytest.fixture(scope="module")
def stub(daemon):
    yield from generation_stub(daemon)


@pytest.fixture(scope="module")
def offline(tiny_text_model_dir):
    path, _ = tiny_text_model_dir
    return LLM(str(path))


def greedy_request(prompt: str, max_tokens: int = 16, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=prompt, sampling=pb.SamplingParams(temperature=0),
                              stopping=pb.StoppingCriteria(max_tokens=max_tokens, **kw))


def wait_pool_idle(stub, timeout: float = 10) -> pb.Load:
    deadline = time.monotonic() + timeout
    while True:
        load = stub.GetLoad(pb.GetLoadRequest())
        if load.kv_blocks_free == load.kv_blocks_total and load.num_running == 0 and load.num_waiting == 0:
            return load
        assert time.monotonic() < deadline, f"KV blocks not returned: {load}"
        time.sleep(0.05)


def test_unary_and_streaming_equal_the_offline_engine(stub, offline):
    expected = offline.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16))
    for prompt, want in zip(PROMPTS, expected):
        unary = stub.Generate(greedy_request(prompt))
        assert list(unary.token_ids) == want.token_ids and unary.text == want.text
        chunks = list(stub.GenerateStream(greedy_request(prompt)))
        assert [t for c in chunks for t in c.token_ids] == want.token_ids
        assert "".join(c.text for c in chunks) == want.text
        assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
        last = chunks[-1]
        assert last.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
        assert last.usage.completion_tokens == len(want.token_ids)
        assert last.usage.prompt_tokens == len(want.prompt_token_ids)
        assert last.timing.e2e_s >= last.timing.ttft_s > 0


def test_request_id_is_echoed_from_field_or_metadata(stub):
    assert stub.Generate(greedy_request("hi", 2, ignore_eos=True).__class__(
        request_id="mine", text="hi", stopping=pb.StoppingCriteria(max_tokens=2))).request_id == "mine"
    resp = stub.Generate(greedy_request("hi", 2), metadata=[("x-request-id", "from-meta")])
    assert resp.request_id == "from-meta"
    assert len(stub.Generate(greedy_request("hi", 2)).request_id) >= 16


def test_64_concurrent_streams_all_complete(stub, offline):
    prompts = [f"Story number {i}:" for i in range(64)]
    expected = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))

    def run(prompt):
        chunks = list(stub.GenerateStream(greedy_request(prompt, 12, ignore_eos=True), timeout=120))
        return [t for c in chunks for t in c.token_ids], chunks[-1].finish_reason

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(run, prompts))
    assert [r[0] for r in results] == [e.token_ids for e in expected]
    assert all(r[1] == pb.FINISH_REASON_LENGTH for r in results)
    wait_pool_idle(stub)


def test_cancel_mid_stream_returns_every_block(stub):
    calls = [stub.GenerateStream(greedy_request(f"cancel me {i}", 400, ignore_eos=True)) for i in range(4)]
    for call in calls:
        next(call)  # tokens are flowing
    for call in calls:
        call.cancel()
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.CANCELLED
    wait_pool_idle(stub)


def test_deadline_expiry_returns_every_block(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(greedy_request("slow", 450, ignore_eos=True), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError) as err:
        list(stub.GenerateStream(greedy_request("slow stream", 450, ignore_eos=True), timeout=0.3))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_pool_idle(stub)


def test_abort_ends_a_stream_with_abort(stub):
    call = stub.GenerateStream(pb.GenerateRequest(request_id="to-abort", text="go", stopping=pb.StoppingCriteria(
        max_tokens=400, ignore_eos=True)))
    next(call)
    assert list(stub.Abort(pb.AbortRequest(request_ids=["to-abort", "unknown"])).aborted_ids) == ["to-abort"]
    rest = list(call)
    assert rest[-1].finish_reason == pb.FINISH_REASON_ABORT
    wait_pool_idle(stub)


INVALID = [
    (dict(), "input"),
    (dict(text=""), "text: the prompt must not be empty"),
    (dict(token_ids=pb.TokenIds(ids=[])), "token_ids.ids: the prompt must not be empty"),
    (dict(token_ids=pb.TokenIds(ids=[10**6])), "outside the vocabulary"),
    (dict(text="x", sampling=pb.SamplingParams(temperature=-1)), "sampling.temperature"),
    (dict(text="x", sampling=pb.SamplingParams(temperature=float("nan"))), "sampling.temperature"),
    (dict(text="x", sampling=pb.SamplingParams(top_p=0)), "sampling.top_p"),
    (dict(text="x", sampling=pb.SamplingParams(seed=-1)), "sampling.seed"),
    (dict(text="x", sampling=pb.SamplingParams(n=17)), "sampling.n"),
    (dict(text="x", sampling=pb.SamplingParams(top_p=1.5)), "sampling.top_p"),
    (dict(text="x", sampling=pb.SamplingParams(top_k=-2)), "sampling.top_k"),
    (dict(text="x", sampling=pb.SamplingParams(min_p=3)), "sampling.min_p"),
    (dict(text="x", sampling=pb.SamplingParams(repetition_penalty=0)), "sampling.repetition_penalty"),
    (dict(text="x", sampling=pb.SamplingParams(frequency_penalty=5)), "sampling.frequency_penalty"),
    (dict(text="x", stopping=pb.StoppingCriteria(max_tokens=0)), "stopping.max_tokens"),
    (dict(text="x", stopping=pb.StoppingCriteria(max_tokens=10**6)), "stopping.max_tokens"),
    (dict(text="x", stopping=pb.StoppingCriteria(max_tokens=2, min_tokens=5)), "stopping.min_tokens"),
    (dict(text="x", stopping=pb.StoppingCriteria(stop=[""])), "stopping.stop"),
    (dict(text="x", stopping=pb.StoppingCriteria(stop=["s"] * 1000)), "stopping.stop"),
    (dict(text="x", stopping=pb.StoppingCriteria(stop_token_ids=[10**6])), "stopping.stop_token_ids"),
    (dict(text="x", output=pb.OutputOptions(logprobs=50)), "output.logprobs"),
    (dict(chat=pb.Chat(messages=[])), "chat.messages"),
    (dict(chat=pb.Chat(messages=[pb.ChatMessage(role="wizard", content="hi")])), "chat.messages[0].role"),
    (dict(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="")])), "chat.messages[0].content"),
    (dict(text="word " * 600), "max_model_len"),
    (dict(text="x", sampling=pb.SamplingParams(logit_bias={5: 100.5})), "sampling.logit_bias"),
    (dict(text="x", sampling=pb.SamplingParams(logit_bias={5: float("nan")})), "sampling.logit_bias"),
    (dict(text="x", sampling=pb.SamplingParams(logit_bias={10**6: 1.0})), "sampling.logit_bias"),
    (dict(text="x", output=pb.OutputOptions(prompt_logprobs=21)), "output.prompt_logprobs"),
    (dict(text="x", truncate_prompt_tokens=0), "truncate_prompt_tokens"),
    (dict(text="x", truncate_prompt_tokens=-2), "truncate_prompt_tokens"),
]


def test_truncate_prompt_tokens_minus_one_leaves_room_for_max_tokens(stub, offline):
    max_model_len = stub.GetModelInfo(pb.GetModelInfoRequest()).max_model_len
    prompt = [7 + i % 50 for i in range(max_model_len + 20)]
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(temperature=0),
                                 stopping=pb.StoppingCriteria(max_tokens=4, ignore_eos=True), truncate_prompt_tokens=-1)
    response = stub.Generate(request)
    assert response.usage.prompt_tokens == max_model_len - 4 and response.usage.completion_tokens == 4
    want = offline.generate(prompt[-(max_model_len - 4):], SamplingParams(temperature=0, max_tokens=4,
                                                                           ignore_eos=True))[0]
    assert list(response.token_ids) == want.token_ids


def test_n_completions_stream_on_their_index_and_come_whole_as_choices(stub, offline):
    want = offline.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8))[0]
    request = greedy_request(PROMPTS[0], max_tokens=8)
    request.sampling.n = 3
    chunks = list(stub.GenerateStream(request))
    for index in range(3):
        mine = [c for c in chunks if c.index == index]
        assert [t for c in mine for t in c.token_ids] == want.token_ids and "".join(c.text for c in mine) == want.text
        assert [c.finish_reason for c in mine if c.finish_reason] == [pb.FINISH_REASON_LENGTH]
    whole = stub.Generate(request)
    assert [c.index for c in whole.choices] == [0, 1, 2] and not whole.token_ids
    assert all(list(c.token_ids) == want.token_ids and c.usage.completion_tokens == 8 for c in whole.choices)
    wait_pool_idle(stub)


@pytest.mark.parametrize("fields, named", INVALID, ids=[n for _, n in INVALID])
def test_invalid_requests_name_the_field(stub, fields, named):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(**fields))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in err.value.details()


def test_the_model_has_one_name_in_model_info_and_metrics(daemon, stub, tiny_text_model_dir):
    name = tiny_text_model_dir[0].resolve().name  # the model directory's own name
    assert stub.GetModelInfo(pb.GetModelInfoRequest()).model == name
    assert f'model_name="{name}"' in scrape(daemon) and 'model_name="' not in scrape(daemon).replace(
        f'model_name="{name}"', "")


def test_tokenize_model_info_and_load(stub, offline):
    ids = stub.Tokenize(pb.TokenizeRequest(text="Hello world", add_special_tokens=True)).token_ids
    assert list(ids) == offline.tokenizer.encode("Hello world")
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="Hi")])
    assert list(stub.Tokenize(pb.TokenizeRequest(chat=chat)).token_ids) == offline.engine.inputs.render_chat(
        [{"role": "user", "content": "Hi"}])
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.vocab_size == offline.engine.vocab_size and info.max_model_len == offline.engine.max_model_len
    assert list(info.eos_token_ids) == list(offline.engine.eos_token_ids) and info.speculative_mode == "off"
    load = wait_pool_idle(stub)
    assert load.kv_cache_usage == 0 and load.max_queue_size == 1024


def test_chat_input_uses_the_template(stub, offline):
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="Say hi")])
    resp = stub.Generate(pb.GenerateRequest(chat=chat, sampling=pb.SamplingParams(temperature=0),
                                            stopping=pb.StoppingCriteria(max_tokens=8)))
    want = offline.chat([{"role": "user", "content": "Say hi"}], SamplingParams(temperature=0, max_tokens=8))[0]
    assert list(resp.token_ids) == want.token_ids


def test_logprobs_and_stop_strings_reach_the_client(stub, offline):
    base = offline.generate("Stop test", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    stop = base.text[len(base.text) // 2:len(base.text) // 2 + 3]
    resp = stub.Generate(pb.GenerateRequest(text="Stop test", sampling=pb.SamplingParams(temperature=0),
                                            stopping=pb.StoppingCriteria(max_tokens=20, stop=[stop], ignore_eos=True),
                                            output=pb.OutputOptions(logprobs=2)))
    assert resp.finish_reason == pb.FINISH_REASON_STOP and resp.stop_string == stop
    assert resp.text == base.text[:base.text.index(stop)]
    assert len(resp.logprobs) == len(resp.token_ids) and all(len(lp.top) == 2 for lp in resp.logprobs)


def test_logit_bias_prompt_logprobs_and_truncation_reach_the_client(stub, offline):
    prompt = offline.tokenizer.encode("The quick brown fox jumps over the lazy dog and runs away")
    plain = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=8))[0].token_ids
    params = SamplingParams(temperature=0, max_tokens=8, logit_bias={plain[0]: -100.0}, prompt_logprobs=2,
                            truncate_prompt_tokens=6)
    want = offline.generate(prompt, params)[0]
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(
        temperature=0, logit_bias={plain[0]: -100.0}), stopping=pb.StoppingCriteria(max_tokens=8),
        output=pb.OutputOptions(prompt_logprobs=2), truncate_prompt_tokens=6)
    for responses in ([stub.Generate(request)], list(stub.GenerateStream(request))):
        assert [t for r in responses for t in r.token_ids] == want.token_ids and plain[0] not in want.token_ids
        entries = responses[0].prompt_logprobs
        assert all(not r.prompt_logprobs for r in responses[1:]) and responses[-1].usage.prompt_tokens == 6
        assert len(entries) == 6 and not entries[0].HasField("logprob")
        for entry, expected in zip(entries[1:], want.prompt_logprobs[1:]):
            assert entry.logprob.token_id == expected.token_id
            assert entry.logprob.logprob == pytest.approx(expected.logprob, abs=1e-5)
            assert [t.token_id for t in entry.logprob.top] == [t for t, _ in expected.top]


def test_health_and_reflection(daemon):
    assert daemon.health("") == "SERVING" and daemon.health() == "SERVING"
    with daemon.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
    assert {"beastserve.v1.Generation", "grpc.health.v1.Health"} <= names


def scrape(daemon) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=5).read().decode()


def sample(text: str, name: str, label: str = "") -> float:
    """Sum of the series called `name` (whose labels include `label`, when given)."""
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_are_exported_and_move(daemon, stub):
    from server.metrics import METRIC_NAMES

    before = scrape(daemon)
    stub.Generate(greedy_request("metrics", 5, ignore_eos=True))
    with pytest.raises(grpc.RpcError):
        stub.Generate(pb.GenerateRequest(text="x", sampling=pb.SamplingParams(top_p=7)))
    after = scrape(daemon)
    for name in METRIC_NAMES:
        assert name in after, name
    generated = "beastserve_generation_tokens_total"
    assert sample(after, generated) >= sample(before, generated) + 5
    assert sample(after, "beastserve_request_success_total") == sample(before, "beastserve_request_success_total") + 1
    invalid = 'code="INVALID_ARGUMENT"'
    assert sample(after, "beastserve_request_failure_total", invalid) == \
        sample(before, "beastserve_request_failure_total", invalid) + 1
    assert sample(after, "beastserve_time_to_first_token_seconds_count") > \
        sample(before, "beastserve_time_to_first_token_seconds_count")
    assert sample(after, "beastserve_inter_token_latency_seconds_count") >= \
        sample(before, "beastserve_inter_token_latency_seconds_count") + 4
