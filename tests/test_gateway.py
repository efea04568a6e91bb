"""beastserve behind the real gateway: the OpenAI Python SDK -> smg (OpenAI HTTP API, chat templates, routing) ->
the daemon's vllm.grpc.engine.VllmEngine service. Real processes and sockets throughout, on the default model
where the answer's text matters and on a tiny model where only routing does."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from server.client import Client
from tests.daemon import Daemon
from tests.gateway import Gateway
from tests.test_server import sample, scrape

QUESTIONS = ["What is the capital of France?", "Name three colours."]
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def default_daemon(tmp_path_factory):
    # Requests logged: a test reads there what the gateway sent.
    log_path = tmp_path_factory.mktemp("daemon") / "daemon.log"
    daemon = Daemon("default", "--log-requests", log_path=log_path).wait_ready(timeout=180)
    yield daemon
    assert daemon.close() == 0


@pytest.fixture(scope="module")
def gateway(default_daemon, tmp_path_factory):
    gateway = Gateway([default_daemon.address], log_path=tmp_path_factory.mktemp("gateway") / "smg.log")
    yield gateway.wait_ready()
    gateway.close()


@pytest.fixture(scope="module")
def sdk(gateway):
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def direct(default_daemon):
    with Client(default_daemon.address, timeout=120) as client:
        yield client


def wait_pool_idle(client: Client, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while True:
        load = client.load()
        if load.num_running == 0 and load.num_waiting == 0 and load.kv_blocks_free == load.kv_blocks_total:
            return load
        assert time.monotonic() < deadline, f"KV blocks not returned: {load}"
        time.sleep(0.05)


def test_models_lists_the_served_name(sdk):
    assert [m.id for m in sdk.models.list().data] == ["SmolLM2-135M-Instruct"]


@pytest.mark.parametrize("question", QUESTIONS)
def test_chat_unary_and_streamed_equal_the_daemons_own_api(sdk, direct, question):
    messages = [{"role": "user", "content": question}]
    want = direct.chat(messages, max_tokens=MAX_TOKENS, temperature=0)
    unary = sdk.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=MAX_TOKENS,
                                        temperature=0)
    assert unary.choices[0].message.content == want.text
    assert unary.choices[0].finish_reason == want.finish_reason
    assert unary.usage.prompt_tokens == want.usage.prompt_tokens
    assert unary.usage.completion_tokens == want.usage.completion_tokens
    chunks = list(sdk.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages,
                                              max_tokens=MAX_TOKENS, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [want.finish_reason]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completions_unary_and_streamed_equal_the_daemons_own_api(sdk, direct, prompt):
    want = direct.generate(prompt, max_tokens=MAX_TOKENS, temperature=0)
    unary = sdk.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=MAX_TOKENS,
                                   temperature=0)
    assert unary.choices[0].text == want.text and unary.choices[0].finish_reason == want.finish_reason
    assert unary.usage.prompt_tokens == want.usage.prompt_tokens
    chunks = list(sdk.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=MAX_TOKENS,
                                         temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text


def test_max_tokens_ends_with_length(sdk):
    out = sdk.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPTS[1], max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3


def test_a_stop_string_cuts_the_answer_there(sdk, direct):
    whole = direct.generate(PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0).text
    stop = whole.split()[2]  # a word inside the greedy answer
    want = direct.generate(PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    assert want.finish_reason == "stop" and want.stop_string == stop
    out = sdk.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPTS[1], max_tokens=MAX_TOKENS,
                                 temperature=0, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == want.text == whole[:whole.index(stop)]


def test_a_refused_field_is_http_400_with_the_daemons_message(sdk):
    with pytest.raises(openai.BadRequestError) as info:
        sdk.completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=4, n=17)
    assert "sampling_params.n: n must be an integer in [1, 16], got 17" in str(info.value)


def test_n_completions_come_back_as_choices(sdk, direct):
    want = direct.generate(PROMPTS[0], max_tokens=8, temperature=0).text
    out = sdk.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPTS[0], max_tokens=8, temperature=0, n=3)
    assert sorted(c.index for c in out.choices) == [0, 1, 2] and [c.text for c in out.choices] == [want] * 3
    sampled = sdk.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPTS[0], max_tokens=8, n=3, seed=5)
    assert len({c.text for c in sampled.choices}) > 1


WEATHER_TOOL = {"type": "function", "function": {
    "name": "weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def tool_sdk(default_daemon, tmp_path_factory):
    """The gateway reading tool calls with a parser that holds a required call to its tool's schema by a structural
    tag (triggered tags, `<tool_call>` then the call's JSON), which it sends to the worker as `structural_tag`."""
    gateway = Gateway([default_daemon.address], "--parser", "symphony", "--tool-call-parser", "qwen",
                      log_path=tmp_path_factory.mktemp("gateway-tools") / "smg.log").wait_ready()
    yield openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=120)
    gateway.close()


def test_a_required_tool_call_comes_back_whole_under_the_gateways_structural_tag(tool_sdk, default_daemon):
    # The tag's JSON allows free whitespace, on which this small model spends ~100 tokens: room to spare.
    out = tool_sdk.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL], tool_choice="required", max_tokens=256, temperature=0)
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    assert "structural_tag='{" in default_daemon.log()  # what held the call to its schema


def test_a_client_gone_mid_stream_frees_its_kv_blocks_in_the_daemon(sdk, direct):
    stream = sdk.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPTS[0], max_tokens=2000,
                                    temperature=0, stream=True, extra_body={"ignore_eos": True})
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].text)
        if received == 3:
            break
    assert direct.load().num_running == 1  # still generating, 2000 tokens to go
    stream.close()  # the HTTP connection goes; the gateway cancels its call; the daemon aborts the request
    wait_pool_idle(direct, timeout=15)


# --- several replicas --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def replicas(tiny_text_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("replicas")
    daemons = [Daemon(tiny_text_model_dir[0], "--drain-timeout", "20", log_path=logs / f"replica{i}.log")
               for i in range(2)]
    for daemon in daemons:
        daemon.wait_ready()
    yield daemons
    for daemon in daemons:
        daemon.close()


def hits(daemon: Daemon) -> float:
    return sample(scrape(daemon), "beastserve_prefix_cache_hits_total")


def successes(daemon: Daemon) -> float:
    return sample(scrape(daemon), "beastserve_request_success_total")


def test_cache_aware_routing_sends_a_shared_prefix_to_the_replica_holding_it(replicas, tiny_text_model_dir,
                                                                             tmp_path):
    gateway = Gateway([d.address for d in replicas], "--policy", "cache_aware", log_path=tmp_path / "smg.log")
    try:
        gateway.wait_ready(num_workers=2)
        sdk = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=60)
        model = sdk.models.list().data[0].id
        prefixes = [" ".join(f"{topic} fact {i}." for i in range(60)) for topic in ("ocean", "mountain", "desert")]
        before = [hits(d) for d in replicas]
        for question in range(4):
            for prefix in prefixes:  # interleaved: each prefix's requests must find their own replica again
                sdk.completions.create(model=model, prompt=f"{prefix} Question {question}:", max_tokens=2,
                                       temperature=0)
        gained = [hits(d) - b for d, b in zip(replicas, before)]
        # Each prefix is ~300 tokens: three later requests per prefix that land on its replica hit ~3 x 288 tokens.
        # Spread at random over two replicas, about half of them would miss.
        assert sum(gained) >= 3 * len(prefixes) * 256, (gained, gateway.log()[-3000:])
    finally:
        gateway.close()


def test_a_draining_replica_leaves_rotation_and_its_accepted_requests_finish(replicas, tiny_text_model_dir,
                                                                           tmp_path):
    survivor = replicas[0]
    leaving = Daemon(tiny_text_model_dir[0], "--drain-timeout", "20", log_path=tmp_path / "leaving.log")
    leaving.wait_ready()
    gateway = Gateway([survivor.address, leaving.address], "--policy", "round_robin", log_path=tmp_path / "smg.log")
    try:
        gateway.wait_ready(num_workers=2)
        sdk = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=60)
        model = sdk.models.list().data[0].id
        with Client(leaving.address, timeout=60) as client:
            # Held by the leaving replica through its drain: it must still be answered in full.
            held = client.stream([5, 6, 7], max_tokens=400, temperature=0, ignore_eos=True)
            first = next(iter(held))
            leaving.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while leaving.address in gateway.healthy_workers():
                assert time.monotonic() < deadline, "the draining replica stayed in rotation"
                time.sleep(0.1)
            assert leaving.proc.poll() is None  # taken out while it still answers
            before = successes(survivor)
            answers = [sdk.completions.create(model=model, prompt=f"Hello {i}", max_tokens=4, temperature=0)
                       for i in range(6)]
            assert all(a.choices[0].finish_reason for a in answers)
            assert successes(survivor) - before == 6  # every new request went to the replica that stays
            rest = list(held)
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 400
        assert rest[-1].finish_reason == "length"
        assert leaving.proc.wait(timeout=30) == 0
    finally:
        gateway.close()
        leaving.close()


def test_killing_a_replica_under_load_loses_nothing_the_survivor_accepted(replicas, tiny_text_model_dir, tmp_path):
    survivor, doomed = replicas[1], Daemon(tiny_text_model_dir[0], log_path=tmp_path / "doomed.log")
    doomed.wait_ready()
    gateway = Gateway([survivor.address, doomed.address], "--policy", "round_robin", "--disable-retries",
                      log_path=tmp_path / "smg.log")
    try:
        gateway.wait_ready(num_workers=2)
        sdk = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=60)
        model = sdk.models.list().data[0].id
        before = successes(survivor)

        def ask(i: int):
            try:
                stream = sdk.completions.create(model=model, prompt=f"Story {i}:", max_tokens=300, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
                chunks = list(stream)
                return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            except openai.APIError as exc:
                return exc

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ask, i) for i in range(8)]
            deadline = time.monotonic() + 20
            while sample(scrape(doomed), "beastserve_num_requests_running") < 1:
                assert time.monotonic() < deadline, "no request reached the doomed replica"
                time.sleep(0.05)
            doomed.proc.kill()
            outcomes = [f.result() for f in futures]
        completed = [o for o in outcomes if o == ["length"]]
        # The gateway does not retry a stream that already began: the doomed replica's requests end with an error
        # (or a cut stream). Every request the survivor accepted is answered in full.
        assert successes(survivor) - before == len(completed) and 0 < len(completed) < len(outcomes), outcomes
        deadline = time.monotonic() + 10
        while doomed.address in gateway.healthy_workers():
            assert time.monotonic() < deadline, "the dead replica stayed in rotation"
            time.sleep(0.1)
        after = [sdk.completions.create(model=model, prompt="Again", max_tokens=3, temperature=0) for _ in range(4)]
        assert all(a.choices[0].finish_reason == "length" for a in after)  # the survivor takes everything
    finally:
        gateway.close()
        doomed.close()
