"""The HTTP API's refusals and endings, on a daemon with TLS, API keys and a one-request queue (a tiny model with
the default model's tokenizer): OpenAI-shaped errors naming the field (400), 401 without a key, 404 for another
model, 429 for a full queue, and a client that goes away aborts its request and frees its KV blocks."""

from __future__ import annotations

import http.client
import json
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import pytest

from server.proto.beastserve.v1 import generate_pb2 as pb
from server.proto.beastserve.v1 import generate_pb2_grpc
from tests.daemon import Daemon
from tests.openai_http import call
from tests.test_server import sample, scrape
from tests.test_server_security import credentials, issue, make_ca, serve

KEY = "secret-key"
AUTH = {"authorization": f"Bearer {KEY}"}
LONG = {"prompt": [1, 2, 3, 4], "max_tokens": 300, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "ca")
    return ca, issue(directory, "server", ca, "serverAuth")


@pytest.fixture(scope="module")
def daemon(tiny_text_model_dir, pki, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("d")
    (tmp / "keys").write_text(KEY + "\n")
    ca, (cert, key) = pki
    daemon = Daemon(tiny_text_model_dir[0], "--api-key-file", str(tmp / "keys"), "--tls-cert-file", str(cert),
                    "--tls-key-file", str(key), "--max-num-seqs", "1", "--max-queue-size", "1",
                    "--kv-cache-bytes", str(8 << 20), log_path=tmp / "daemon.log", channel_credentials=credentials(ca))
    daemon.http_url = daemon.http_url.replace("http://", "https://")
    yield from serve(daemon)


@pytest.fixture(scope="module")
def tls(pki):
    return ssl.create_default_context(cafile=str(pki[0][0]))


@pytest.fixture(scope="module")
def sdk(daemon, tls):
    return openai.OpenAI(base_url=daemon.http_url + "/v1", api_key=KEY, max_retries=0, timeout=60,
                         http_client=httpx2.Client(verify=tls))


def post(daemon, tls, path: str, body, headers=AUTH):
    return call(daemon.http_url + path, body, headers=headers, context=tls)


def wait_pool_idle(daemon, timeout: float = 10) -> pb.Load:
    with daemon.channel() as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        deadline = time.monotonic() + timeout
        while True:
            load = stub.GetLoad(pb.GetLoadRequest(), metadata=[("authorization", f"Bearer {KEY}")], timeout=5)
            if load.num_running == 0 and load.num_waiting == 0 and load.kv_blocks_free == load.kv_blocks_total:
                return load
            assert time.monotonic() < deadline, f"KV blocks not returned: {load}"
            time.sleep(0.05)


def test_without_a_key_401_and_health_stays_open(daemon, tls, sdk):
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
        status, body = post(daemon, tls, "/v1/completions", {"prompt": "hi"}, headers)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert call(daemon.http_url + "/v1/models", context=tls)[0] == 401
    assert call(daemon.http_url + "/health", context=tls)[0] == 200  # for probes, as gRPC's health service
    assert sdk.completions.create(model=sdk.models.list().data[0].id, prompt="hi",
                                  max_tokens=2).usage.completion_tokens == 2


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "n": 17}, "n"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "stop": ["x"] * 65}, "stop"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 100000}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [10 ** 7]]}, "prompt[1]"),
    ("/v1/completions", {"prompt": "hi", "suffix": "!"}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "frobnicate": True}, "frobnicate"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {"regex": "("}}, "structured_outputs"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://example.invalid/cat.png"}}]}]}, "messages[0].content[0].type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 30},
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
])
def test_bad_input_is_400_naming_the_field(daemon, tls, path, body, param):
    status, answer = post(daemon, tls, path, body)
    error = answer["error"]
    assert status == 400 and error["param"] == param and error["type"] == "invalid_request_error", answer
    assert error["message"].startswith(param), error["message"]


def test_malformed_json_another_model_and_no_such_path(daemon, tls, sdk):
    status, answer = post(daemon, tls, "/v1/completions", b'{"prompt": "hi",')
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as err:
        sdk.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    assert err.value.body["param"] == "model" and "gpt-4" in err.value.body["message"]
    assert post(daemon, tls, "/v1/embeddings", {"input": "hi"})[0] == 404


def test_a_full_queue_is_429_and_nothing_is_dropped(daemon, tls):
    wait_pool_idle(daemon)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: post(daemon, tls, "/v1/completions", LONG), range(8)))
    statuses = [status for status, _ in results]
    assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
    for status, answer in results:
        if status == 200:
            assert answer["usage"]["completion_tokens"] == 300
        else:
            assert answer["error"]["code"] == "rate_limit_exceeded" and "max_queue_size" in answer["error"]["message"]
    wait_pool_idle(daemon)


def _open(daemon, tls, body: dict) -> http.client.HTTPSConnection:
    host, port = daemon.http_url.removeprefix("https://").split(":")
    connection = http.client.HTTPSConnection(host, int(port), context=tls, timeout=30)
    connection.request("POST", "/v1/completions", json.dumps(body), {**AUTH, "content-type": "application/json"})
    return connection


def test_a_client_that_goes_away_frees_its_blocks(daemon, tls):
    wait_pool_idle(daemon)
    failure = "beastserve_request_failure_total"
    cancelled = []
    for stream in (True, False):
        before = sample(scrape(daemon), failure, 'code="CANCELLED"')
        client = _open(daemon, tls, {**LONG, "max_tokens": 500, "stream": stream})
        if stream:
            response = client.getresponse()
            assert response.status == 200 and response.read1(64).startswith(b"data: ")  # generating
            response.close()
        assert running(daemon) == 1
        client.close()  # gone mid-stream, or before its answer
        wait_pool_idle(daemon)
        cancelled.append(sample(scrape(daemon), failure, 'code="CANCELLED"') - before)
    assert cancelled == [1, 1]


def running(daemon, timeout: float = 10) -> int:
    """Requests running, once one is."""
    with daemon.channel() as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        deadline = time.monotonic() + timeout
        while (load := stub.GetLoad(pb.GetLoadRequest(), metadata=[("authorization", f"Bearer {KEY}")])).num_running \
                == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        return load.num_running
