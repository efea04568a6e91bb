"""The daemon's own OpenAI HTTP API through the openai SDK, sync and async, streamed and not, on the default model:
answers equal the daemon's gRPC API's on the same daemon (speculation on, greedy), logprobs, echo and prompt
logprobs agree with gRPC's, token-id prompts, and vLLM's extensions are honoured."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from server.client import Client
from tests.daemon import Daemon
from tests.openai_http import call
from tests.test_gateway import wait_pool_idle
from tests.test_server import sample, scrape

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three colours."}]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    # Drafting every step (not by measured gain), so a request's own speculation setting shows in the metrics.
    daemon = Daemon("default", "--speculative", "ngram", "--no-adaptive-speculation",
                    log_path=tmp_path_factory.mktemp("d") / "daemon.log")
    yield daemon.wait_ready(timeout=180)
    assert daemon.close() == 0


@pytest.fixture(scope="module")
def sdk(daemon):
    return openai.OpenAI(base_url=daemon.http_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def direct(daemon):
    with Client(daemon.address, timeout=120) as client:
        yield client


def test_models_and_tokenize_name_the_served_model(sdk, daemon, direct):
    assert [m.id for m in sdk.models.list().data] == [MODEL]
    status, tokens = call(daemon.http_url + "/tokenize", {"prompt": PROMPT})
    assert status == 200 and tokens["tokens"] == list(direct.tokenize(PROMPT))
    assert call(daemon.http_url + "/detokenize", {"tokens": tokens["tokens"]})[1]["prompt"] == PROMPT
    status, info = call(daemon.http_url + "/tokenizer_info")
    assert status == 200 and info["eos_token"] == "<|im_end|>" and "im_start" in info["chat_template"]


def test_completions_unary_streamed_and_async_equal_grpc(sdk, daemon, direct):
    want = direct.generate(PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    unary = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert unary.choices[0].text == want.text and unary.choices[0].finish_reason == want.finish_reason
    assert (unary.usage.prompt_tokens, unary.usage.completion_tokens) == (want.usage.prompt_tokens,
                                                                          want.usage.completion_tokens)
    chunks = list(sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.usage.completion_tokens

    async def both():
        client = openai.AsyncOpenAI(base_url=daemon.http_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        async with client:
            unary = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
            stream = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                                     temperature=0, stream=True)
            return unary.choices[0].text, "".join([c.choices[0].text async for c in stream])

    assert asyncio.run(both()) == (want.text, want.text)


def test_chat_unary_streamed_and_async_equal_grpc(sdk, daemon, direct):
    want = direct.chat(MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    unary = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    assert unary.choices[0].message.content == want.text
    assert unary.usage.prompt_tokens == want.usage.prompt_tokens
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=MAX_TOKENS,
                                              temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [want.finish_reason]

    async def streamed():
        client = openai.AsyncOpenAI(base_url=daemon.http_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        async with client:
            stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                          temperature=0, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream])

    assert asyncio.run(streamed()) == want.text


def test_echo_logprobs_and_prompt_logprobs_agree_with_grpc(sdk, direct):
    want = direct.generate(PROMPT, max_tokens=4, temperature=0, logprobs=3, prompt_logprobs=3)
    prompt_ids = list(direct.tokenize(PROMPT))
    out = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3, echo=True,
                                 extra_body={"prompt_logprobs": 3}).choices[0]
    assert out.text == PROMPT + want.text
    lp = out.logprobs
    assert len(lp.tokens) == len(prompt_ids) + 4 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    grpc_prompt = [p.logprob.logprob for p in want.prompt_logprobs[1:]]
    assert lp.token_logprobs[1:len(prompt_ids)] == pytest.approx(grpc_prompt, abs=1e-6)
    assert lp.token_logprobs[len(prompt_ids):] == pytest.approx([t.logprob for t in want.logprobs], abs=1e-6)
    for top, token_lp in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]):
        assert 3 <= len(top) <= 4 and max(top.values()) >= token_lp  # the 3 best, and the token itself
    # text_offset: where each token starts in the choice's text
    assert [out.text[o:o + len(t)] for o, t in zip(lp.text_offset, lp.tokens)] == lp.tokens
    vllm_prompt = out.model_extra["prompt_logprobs"]
    assert vllm_prompt[0] is None and len(vllm_prompt) == len(prompt_ids)
    assert vllm_prompt[1][str(prompt_ids[1])]["logprob"] == pytest.approx(grpc_prompt[0], abs=1e-6)


def test_chat_logprobs_carry_the_top_alternatives(sdk, direct):
    want = direct.chat(MESSAGES, max_tokens=4, temperature=0, logprobs=2)
    choice = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                                         top_logprobs=2).choices[0]
    content = choice.logprobs.content
    assert "".join(c.token for c in content) == want.text
    assert [c.logprob for c in content] == pytest.approx([t.logprob for t in want.logprobs], abs=1e-6)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob for c in content)


def test_token_id_prompts_one_and_batches(sdk, direct):
    texts = ["def fibonacci(n):", PROMPT]
    ids = [list(direct.tokenize(t)) for t in texts]
    wants = [direct.generate(i, max_tokens=8, temperature=0).text for i in ids]
    one = sdk.completions.create(model=MODEL, prompt=ids[0], max_tokens=8, temperature=0)
    assert one.choices[0].text == wants[0]
    for prompt in (ids, texts):  # a batch of token lists, a batch of strings
        batch = sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, n=2)
        assert [c.index for c in batch.choices] == [0, 1, 2, 3]
        assert [c.text for c in batch.choices] == [wants[0], wants[0], wants[1], wants[1]]
        assert batch.usage.prompt_tokens == sum(len(i) for i in ids)


def test_sampling_extensions_are_honoured(sdk, daemon, direct):
    stops = ["\n", ".", ",", "!", "?", ";"]  # more than the 4 the OpenAI API allows
    stopped = sdk.completions.create(model=MODEL, prompt="One, two, three", max_tokens=32, temperature=0, stop=stops)
    assert stopped.choices[0].finish_reason == "stop" and not any(s in stopped.choices[0].text for s in stops)
    token = direct.tokenize(" banana", add_special_tokens=False)[0]
    text = call(daemon.http_url + "/detokenize", {"tokens": [token]})[1]["prompt"]
    biased = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0,
                                    logit_bias={str(token): 100})
    assert biased.choices[0].text == text * 3
    seeded = [sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    long = sdk.completions.create(model=MODEL, prompt="Hi", max_tokens=6, temperature=0,
                                  extra_body={"min_tokens": 6, "ignore_eos": True, "stop_token_ids": [2]})
    assert long.usage.completion_tokens == 6 and long.choices[0].finish_reason == "length"


def test_structured_outputs_and_response_format(sdk):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}}, "required": ["colour"],
              "additionalProperties": False}
    out = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0,
                                      response_format={"type": "json_schema",
                                                       "json_schema": {"name": "c", "schema": schema}})
    assert set(json.loads(out.choices[0].message.content)) == {"colour"}
    chose = sdk.completions.create(model=MODEL, prompt="Is the sky blue? Answer:", max_tokens=5, temperature=0,
                                   extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert chose.choices[0].text in ("yes", "no")


def test_speculation_per_request_as_on_grpc(sdk, daemon):
    prompt = "Repeat: the cat sat on the mat, the cat sat on the mat, the cat sat on the mat, the cat"
    drafts = "beastserve_spec_decode_num_drafts_total"
    before = sample(scrape(daemon), drafts)
    off = sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                 extra_body={"speculative": {"enabled": False}})
    assert sample(scrape(daemon), drafts) == before  # nothing drafted for it
    on = sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    assert sample(scrape(daemon), drafts) > before and on.choices[0].text == off.choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=2, extra_body={"speculative": {"depth": 2}})
    assert err.value.body["param"] == "speculative.depth"


def test_http_requests_are_counted_in_the_request_metrics(sdk, daemon, direct):
    wait_pool_idle(direct)
    before = scrape(daemon)
    sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
    with pytest.raises(openai.BadRequestError):
        sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=-1)
    after = scrape(daemon)
    success, failure = "beastserve_request_success_total", "beastserve_request_failure_total"
    assert sample(after, success) - sample(before, success) == 1
    assert sample(after, failure, 'code="INVALID_ARGUMENT"') - sample(before, failure, 'code="INVALID_ARGUMENT"') == 1
