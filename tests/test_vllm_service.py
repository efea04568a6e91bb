"""The gateways' worker protocol, vllm.grpc.engine.VllmEngine, called as grpcurl would: the service and its
messages are learnt from the daemon's reflection service (no generated stubs), then every RPC is called,
with good and bad input, over a real socket."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import time
import zipfile

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from scheduler import LLM, SamplingParams
from tests.daemon import Daemon, serve_for_module

SERVICE = "vllm.grpc.engine.VllmEngine"


@pytest.fixture(scope="module")
def daemon(tiny_text_model_dir, tmp_path_factory):
    yield from serve_for_module(tiny_text_model_dir[0], tmp_path_factory, "--max-model-len", "512")


class Reflected:
    """Calls any method of a service by name with a dict request, as grpcurl does, from reflected descriptors."""

    def __init__(self, channel: grpc.Channel, service: str):
        self.channel = channel
        self.pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        self.service = self.pool.FindServiceByName(service)

    def call(self, method: str, request: dict | None = None, timeout: float = 30):
        """The response as a dict (server-streaming methods: the list of responses)."""
        response = self._invoke(method, request, timeout)
        return list(response) if isinstance(response, _Dicts) else _as_dict(response)

    def stream(self, method: str, request: dict, timeout: float = 60) -> _Dicts:
        """A server-streaming call left open, yielding dicts as they arrive."""
        return self._invoke(method, request, timeout)

    def _invoke(self, method: str, request: dict | None, timeout: float):
        m = self.service.FindMethodByName(method)
        request_cls = message_factory.GetMessageClass(m.input_type)
        response_cls = message_factory.GetMessageClass(m.output_type)
        kind = self.channel.unary_stream if m.server_streaming else self.channel.unary_unary
        rpc = kind(f"/{self.service.full_name}/{m.name}", request_serializer=request_cls.SerializeToString,
                   response_deserializer=response_cls.FromString)
        response = rpc(json_format.ParseDict(request or {}, request_cls()), timeout=timeout)
        return _Dicts(response) if m.server_streaming else response


class _Dicts:
    def __init__(self, call):
        self.call = call

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return _as_dict(next(self.call))


def _as_dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


@pytest.fixture(scope="module")
def engine(daemon):
    with daemon.channel() as channel:
        yield Reflected(channel, SERVICE)


@pytest.fixture(scope="module")
def offline(tiny_text_model_dir):
    return LLM(str(tiny_text_model_dir[0]), max_model_len=512)


def generate(prompt: list[int], stream: bool = False, **sampling) -> dict:
    return {"request_id": "", "tokenized": {"input_ids": prompt},
            "sampling_params": {"temperature": 0, "max_tokens": 8, **sampling}, "stream": stream}


def test_reflection_lists_both_generation_services(daemon):
    with daemon.channel() as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert {SERVICE, "beastserve.v1.Generation"} <= set(database.get_services())


def test_generate_whole_and_streamed_equal_the_offline_engine(engine, offline):
    prompt = [11, 12, 13, 14, 15]
    want = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=8))[0]
    (whole,) = engine.call("Generate", generate(prompt))
    complete = whole["complete"]
    assert [int(t) for t in complete["output_ids"]] == want.token_ids
    assert complete["finish_reason"] == "length" and complete["prompt_tokens"] == 5
    assert complete["completion_tokens"] == 8
    messages = engine.call("Generate", generate(prompt, stream=True))
    chunks, last = [m["chunk"] for m in messages[:-1]], messages[-1]["complete"]
    assert [t for c in chunks for t in c["token_ids"]] == want.token_ids
    assert chunks[-1]["completion_tokens"] == 8 and last["finish_reason"] == "length"


def test_n_completions_arrive_each_on_its_index(engine, offline):
    prompt = [31, 32, 33, 34]
    want = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=8))[0].token_ids
    messages = engine.call("Generate", generate(prompt, stream=True, n=3))
    for index in range(3):
        mine = [m for m in messages if m.get("chunk", m.get("complete", {})).get("index", 0) == index]
        assert [t for m in mine if "chunk" in m for t in m["chunk"]["token_ids"]] == want  # greedy: all alike
        assert [m["complete"]["finish_reason"] for m in mine if "complete" in m] == ["length"]
    whole = engine.call("Generate", generate(prompt, n=3))
    assert sorted(m["complete"].get("index", 0) for m in whole) == [0, 1, 2]
    assert all(m["complete"]["output_ids"] == want for m in whole)


def test_text_input_is_tokenized_by_the_daemon(engine, offline):
    want = offline.generate(["Hello there"], SamplingParams(temperature=0, max_tokens=4))[0]
    request = {"text": "Hello there", "sampling_params": {"temperature": 0, "max_tokens": 4}}
    (whole,) = engine.call("Generate", request)
    assert whole["complete"]["output_ids"] == want.token_ids


def test_a_stop_token_is_reported_as_matched(engine, offline):
    prompt = [21, 22, 23]
    first = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0].token_ids[0]
    (whole,) = engine.call("Generate", generate(prompt, stop_token_ids=[first]))
    assert whole["complete"]["finish_reason"] == "stop" and whole["complete"]["matched_token_id"] == first


def test_logprobs_come_per_token_with_the_top_alternatives(engine):
    (whole,) = engine.call("Generate", generate([1, 2, 3], max_tokens=3, logprobs=2))
    lp = whole["complete"]["output_logprobs"]
    assert lp["token_ids"] == whole["complete"]["output_ids"] and len(lp["token_logprobs"]) == 3
    assert all(len(top["token_ids"]) == 2 for top in lp["top_logprobs"])
    (only_chosen,) = engine.call("Generate", generate([1, 2, 3], max_tokens=3, logprobs=0))
    assert all(not top for top in only_chosen["complete"]["output_logprobs"]["top_logprobs"])


def test_truncate_prompt_tokens_keeps_the_last_ones(engine, offline):
    prompt = list(range(30, 60))
    want = offline.generate([prompt[-8:]], SamplingParams(temperature=0, max_tokens=8))[0]
    (whole,) = engine.call("Generate", generate(prompt, truncate_prompt_tokens=8))
    assert whole["complete"]["prompt_tokens"] == 8 and whole["complete"]["output_ids"] == want.token_ids


def test_truncate_prompt_tokens_minus_one_leaves_room_for_max_tokens(engine, offline):
    prompt = [30 + i % 50 for i in range(600)]  # max_model_len is 512
    want = offline.generate([prompt[-508:]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    (whole,) = engine.call("Generate", generate(prompt, max_tokens=4, ignore_eos=True, truncate_prompt_tokens=-1))
    assert whole["complete"]["prompt_tokens"] == 508 and whole["complete"]["output_ids"] == want.token_ids


def test_logit_bias_steers_greedy_decoding(engine, offline):
    prompt = [31, 32, 33]
    plain = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=8))[0].token_ids
    bias = {plain[0]: -100.0, 77: 3.0}
    want = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=8, logit_bias=bias))[0].token_ids
    assert want != plain
    (whole,) = engine.call("Generate", generate(prompt, logit_bias={str(t): b for t, b in bias.items()}))
    assert whole["complete"]["output_ids"] == want
    (forced,) = engine.call("Generate", generate(prompt, logit_bias={"42": 100.0}))
    assert forced["complete"]["output_ids"] == [42] * 8


def test_prompt_logprobs_come_in_the_first_chunk_and_the_complete_answer(engine, offline):
    prompt = list(range(40, 70))
    want = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2))[0]
    (whole,) = engine.call("Generate", generate(prompt, max_tokens=4, prompt_logprobs=2))
    lp = whole["complete"]["input_logprobs"]
    assert lp["token_ids"] == prompt and lp["token_logprobs"][0] == {} and lp["top_logprobs"][0] == {}
    for entry, value, top in zip(want.prompt_logprobs[1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert value["value"] == pytest.approx(entry.logprob, abs=1e-5)
        assert top["token_ids"] == [t for t, _ in entry.top] and len(top["values"]) == 2
    messages = engine.call("Generate", generate(prompt, stream=True, max_tokens=4, prompt_logprobs=2))
    chunks = [m["chunk"] for m in messages[:-1]]
    assert chunks[0]["input_logprobs"] == lp and all("input_logprobs" not in c for c in chunks[1:])
    (only_own,) = engine.call("Generate", generate(prompt, max_tokens=1, prompt_logprobs=0))
    assert all(not top for top in only_own["complete"]["input_logprobs"]["top_logprobs"])


def test_a_choice_constraint_is_served(engine, default_tokenizer):
    choices = ["alpha", "beta gamma"]
    (whole,) = engine.call("Generate", generate([11, 12, 13], max_tokens=16, choice={"choices": choices}))
    complete = whole["complete"]
    text = default_tokenizer.decode([int(t) for t in complete["output_ids"]], skip_special_tokens=True)
    assert text in choices and complete["finish_reason"] == "stop"


def test_a_structural_tag_is_served(engine, default_tokenizer):
    """What the gateway sends to hold tool calls to their schemas, in both forms: the output is one tagged part,
    its content valid; and the older form (free text, a trigger opening a tagged part) is served, not refused."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
    forced = {"type": "structural_tag", "format": {"type": "tag", "begin": "<call>", "end": "</call>", "content": {
        "type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1}}}  # else blanks, at random weights
    (whole,) = engine.call("Generate", generate([11, 12, 13], max_tokens=24, structural_tag=json.dumps(forced)))
    complete = whole["complete"]
    text = default_tokenizer.decode([int(t) for t in complete["output_ids"]], skip_special_tokens=True)
    assert complete["finish_reason"] == "stop" and text.startswith("<call>") and text.endswith("</call>"), text
    assert 0 <= json.loads(text.removeprefix("<call>").removesuffix("</call>"))["n"] <= 9
    older = {"structures": [{"begin": "<call>", "schema": schema, "end": "</call>"}], "triggers": ["<call>"]}
    (whole,) = engine.call("Generate", generate([11, 12, 13], max_tokens=4, structural_tag=json.dumps(older)))
    assert len(whole["complete"]["output_ids"]) >= 1


def test_abort_ends_a_running_request(engine):
    call = engine.stream("Generate", {**generate([7, 8, 9], stream=True, max_tokens=400, ignore_eos=True),
                                      "request_id": "to-abort"})
    first = next(call)
    assert "chunk" in first
    assert engine.call("Abort", {"request_ids": ["to-abort"]}) == {}
    rest = list(call)
    assert rest[-1]["complete"]["finish_reason"] == "abort"
    assert sum(len(m.get("chunk", {}).get("token_ids", [])) for m in [first, *rest]) < 400


def test_loads_count_running_requests_and_kv_use(engine):
    call = engine.stream("Generate", {**generate([7, 8, 9], stream=True, max_tokens=400, ignore_eos=True),
                                      "request_id": "held"})
    next(call)
    (load,) = engine.call("GetLoads", {"include": ["core"]})["loads"]
    assert load["num_running_reqs"] == 1 and 0 < load["token_usage"] < 1 and load["max_running_requests"] == 256
    assert load["num_used_tokens"] > 0 and load["max_total_num_tokens"] > load["num_used_tokens"]
    engine.call("Abort", {"request_ids": ["held"]})
    list(call)


def test_model_and_server_info_describe_this_daemon(engine, tiny_text_model_dir, default_tokenizer):
    info = engine.call("GetModelInfo")
    assert info["served_model_name"] == info["model_path"] == tiny_text_model_dir[0].resolve().name  # no path here
    assert info["is_generation"] and info["max_context_length"] == 512 and info["max_req_input_len"] == 511
    assert info["vocab_size"] == len(default_tokenizer) and info["eos_token_ids"] == [default_tokenizer.eos_token_id]
    assert info["architectures"] == ["LlamaForCausalLM"] and info["model_type"] == "llama"
    server = engine.call("GetServerInfo")
    assert server["server_type"] == "vllm-grpc" and server["block_size"] == 16 and server["uptime_seconds"] > 0
    assert server["max_num_seqs"] == 256  # what the engine chose on the CPU, the flag being unset


def test_health_is_readiness(engine):
    assert engine.call("HealthCheck") == {"healthy": True, "message": "ready"}


def test_the_tokenizer_arrives_as_a_zip_with_its_fingerprint(engine, default_tokenizer):
    from transformers import PreTrainedTokenizerFast

    chunks = engine.call("GetTokenizer")
    data = b"".join(__import__("base64").b64decode(c.get("data", "")) for c in chunks)
    assert chunks[-1]["sha256"] == hashlib.sha256(data).hexdigest()
    assert all("sha256" not in c for c in chunks[:-1])
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = set(archive.namelist())
        assert "tokenizer.json" in names
        rebuilt = PreTrainedTokenizerFast(tokenizer_object=__import__("tokenizers").Tokenizer.from_str(
            archive.read("tokenizer.json").decode()))
    text = "A chat, with <|im_start|> tokens."
    assert rebuilt.encode(text) == default_tokenizer.encode(text)


def test_flush_cache_drops_the_prefix_cache(engine):
    prompt = list(range(100, 164))  # four full blocks
    engine.call("Generate", generate(prompt, max_tokens=1))
    (again,) = engine.call("Generate", generate(prompt, max_tokens=1))
    assert again["complete"]["cached_tokens"] == 48  # the last block is always recomputed
    flushed = engine.call("FlushCache", {"timeout_s": 5})
    assert flushed["success"] and flushed["message"].endswith("cached blocks dropped")
    (after,) = engine.call("Generate", generate(prompt, max_tokens=1))
    assert after["complete"].get("cached_tokens", 0) == 0


@pytest.mark.parametrize("method, request_", [("Embed", {"request_id": "e", "tokenized": {"input_ids": [1]}}),
                                              ("StartProfile", {}), ("StopProfile", {})])
def test_what_is_not_served_says_so(engine, method, request_):
    with pytest.raises(grpc.RpcError) as info:
        engine.call(method, request_)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and method in info.value.details()


BAD = [
    ({"sampling_params": {"n": 17}}, "sampling_params.n"),
    ({"sampling_params": {"prompt_logprobs": -1}}, "sampling_params.prompt_logprobs"),
    ({"sampling_params": {"prompt_logprobs": 21}}, "sampling_params.prompt_logprobs"),
    ({"sampling_params": {"logit_bias": {"5": 200.0}}}, "sampling_params.logit_bias"),
    ({"sampling_params": {"logit_bias": {"-5": 1.0}}}, "sampling_params.logit_bias"),
    ({"sampling_params": {"logit_bias": {"1000000": 1.0}}}, "sampling_params.logit_bias"),
    ({"sampling_params": {"json_schema": "{not json"}}, "sampling_params.json_schema"),
    ({"sampling_params": {"json_schema": '{"type": "frog"}'}}, "sampling_params.json_schema"),
    ({"sampling_params": {"regex": "(a"}}, "sampling_params.regex"),
    ({"sampling_params": {"grammar": "root ::= missing"}}, "sampling_params.grammar"),
    ({"sampling_params": {"choice": {"choices": []}}}, "sampling_params.choice"),
    ({"sampling_params": {"structural_tag": "{}"}}, "sampling_params.structural_tag"),
    ({"sampling_params": {"logprobs": -1}}, "sampling_params.logprobs"),
    ({"sampling_params": {"logprobs": 50}}, "sampling_params.logprobs"),
    ({"sampling_params": {"top_p": 1.5}}, "sampling_params.top_p"),
    ({"sampling_params": {"temperature": -1}}, "sampling_params.temperature"),
    ({"sampling_params": {"seed": -3}}, "sampling_params.seed"),
    ({"sampling_params": {"max_tokens": 0}}, "sampling_params.max_tokens"),
    ({"sampling_params": {"max_tokens": 100000}}, "max_model_len"),
    ({"sampling_params": {"stop_token_ids": [10**6]}}, "sampling_params.stop_token_ids"),
    ({"sampling_params": {"truncate_prompt_tokens": 0}}, "sampling_params.truncate_prompt_tokens"),
    ({"tokenized": {"input_ids": []}}, "tokenized.input_ids"),
    ({"tokenized": {"input_ids": [10**6]}}, "outside the vocabulary"),
    ({"tokenized": None}, "input: one of tokenized or text is required"),
    ({"mm_inputs": {"im_token_id": 3}}, "mm_inputs"),
    ({"kv_transfer_params_json": "{}"}, "kv_transfer_params_json"),
    ({"data_parallel_rank": 1}, "data_parallel_rank"),
]


@pytest.mark.parametrize("change, named", BAD, ids=[n for _, n in BAD])
def test_bad_input_is_invalid_argument_naming_the_field(engine, change, named):
    request = generate([1, 2, 3])
    for key, value in change.items():
        if value is None:
            del request[key]
        elif isinstance(value, dict) and key == "sampling_params":
            request[key] = {**request[key], **value}
        else:
            request[key] = value
    with pytest.raises(grpc.RpcError) as info:
        engine.call("Generate", request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in info.value.details()


def test_health_turns_unhealthy_while_draining(tiny_text_model_dir, tmp_path):
    daemon = Daemon(tiny_text_model_dir[0], "--drain-timeout", "20", log_path=tmp_path / "daemon.log").wait_ready()
    try:
        with daemon.channel() as channel:
            engine = Reflected(channel, SERVICE)
            call = engine.stream("Generate", generate([4, 5, 6], stream=True, max_tokens=300, ignore_eos=True))
            next(call)
            daemon.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (health := engine.call("HealthCheck")).get("healthy"):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert health == {"message": "server is shutting down; retry elsewhere"}
            assert list(call)[-1]["complete"]["finish_reason"] == "length"  # the accepted request still finishes
        assert daemon.proc.wait(timeout=30) == 0
    finally:
        daemon.close()


def test_kv_events_follow_the_prefix_cache_from_its_contents_on(engine):
    prompt = list(range(200, 240))  # two full blocks and a part
    engine.call("Generate", generate(prompt, max_tokens=1))
    events = engine.stream("SubscribeKvEvents", {"start_sequence_number": 41}, timeout=30)
    opening = next(events)
    # Numbered on from where the subscriber says it is, opening with the whole cache.
    assert opening["sequence_number"] == "42" and "cleared" in opening["events"][0]
    known = {int(b["block_hash"]): b for e in opening["events"][1:] for b in e["stored"]["blocks"]}
    first, second = (known[h] for h in known if known[h]["token_ids"] in (prompt[:16], prompt[16:32]))
    assert first["token_ids"] == prompt[:16] and second["token_ids"] == prompt[16:32]

    fresh = list(range(300, 340))
    engine.call("Generate", generate(fresh, max_tokens=1))
    batch = next(events)
    assert batch["sequence_number"] == "43"
    stored = [e["stored"] for e in batch["events"]]
    assert [b["token_ids"] for s_ in stored for b in s_["blocks"]] == [fresh[:16], fresh[16:32]]
    # Each block names the one before it, as a router chains them.
    assert "parent_block_hash" not in stored[0]
    assert stored[1]["parent_block_hash"] == stored[0]["blocks"][0]["block_hash"]

    engine.call("FlushCache", {"timeout_s": 5})
    assert "cleared" in next(events)["events"][0]
    events.call.cancel()
