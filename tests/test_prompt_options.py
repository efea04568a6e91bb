"""Prompt logprobs equal transformers' log-softmax of the prompt, whether the prompt is chunked, found in the
prefix cache or recomputed after preemption; truncate_prompt_tokens keeps the prompt's end."""

from __future__ import annotations

import random

import pytest
import torch

from scheduler import LLM, Engine, SamplingParams
from tests.conftest import hf_greedy
from tests.helpers import assert_pool_idle, run_engine

NUM_TOP = 3


def hf_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt), vocab] float32 log-softmax: row i is the distribution of token i + 1."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def assert_prompt_logprobs(model, prompt: list[int], entries, num_top: int = NUM_TOP, tolerance: float = 1e-4) -> None:
    reference = hf_prompt_logprobs(model, prompt)
    assert len(entries) == len(prompt) and entries[0] is None
    for i, entry in enumerate(entries[1:], start=1):
        assert entry.token_id == prompt[i]
        assert abs(entry.logprob - reference[i - 1, prompt[i]].item()) < tolerance, i
        top = reference[i - 1].topk(num_top)
        assert [t for t, _ in entry.top] == top.indices.tolist(), i
        assert all(abs(v - w) < tolerance for (_, v), w in zip(entry.top, top.values.tolist())), i


def prompts_of(vocab_size: int, lengths, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths]


ASKING = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=NUM_TOP)
PLAIN = SamplingParams(temperature=0, max_tokens=8)


def test_prompt_logprobs_of_chunked_prompts_equal_hf(tiny_model_dir):
    path, model = tiny_model_dir
    prompts = prompts_of(model.config.vocab_size, (1, 2, 40, 100))
    # A 16-token budget: the longer prompts arrive over several steps, next to requests that ask for nothing.
    engine = Engine(model=str(path), dtype="float32", max_num_batched_tokens=16)
    params = [ASKING, PLAIN, ASKING, ASKING, PLAIN]
    outputs = run_engine(engine, prompts + [prompts[3]], params, arrive_every=1)
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == hf_greedy(model, prompt, 8)
    for i in (0, 2, 3):
        assert_prompt_logprobs(model, prompts[i], outputs[i].prompt_logprobs)
    assert outputs[1].prompt_logprobs is None and outputs[4].prompt_logprobs is None
    assert_pool_idle(engine)


def test_prompt_logprobs_come_with_the_first_output(tiny_model_dir):
    path, model = tiny_model_dir
    engine = Engine(model=str(path), dtype="float32", max_num_batched_tokens=16)
    prompt = prompts_of(model.config.vocab_size, (50,))[0]
    stream = engine.add_request(None, ASKING, prompt_token_ids=prompt)
    deltas = []
    while engine.has_unfinished():
        engine.step()
        while (delta := stream.get_nowait()) is not None:
            deltas.append(delta)
    assert deltas[0].token_ids and len(deltas[0].prompt_logprobs) == len(prompt)
    assert all(d.prompt_logprobs is None for d in deltas[1:])


def test_a_prefix_cache_hit_still_returns_every_prompt_logprob(tiny_model_dir):
    path, model = tiny_model_dir
    shared, tail_a, tail_b = prompts_of(model.config.vocab_size, (70, 9, 12), seed=1)
    engine = Engine(model=str(path), dtype="float32")
    first = run_engine(engine, [shared + tail_a], PLAIN)[0]
    asking = run_engine(engine, [shared + tail_b], ASKING)[0]
    assert asking.num_cached_tokens == 0  # it computes its whole prompt...
    assert_prompt_logprobs(model, shared + tail_b, asking.prompt_logprobs)
    assert asking.token_ids == hf_greedy(model, shared + tail_b, 8)
    later = run_engine(engine, [shared + tail_b], PLAIN)[0]
    assert later.num_cached_tokens >= 64 and later.token_ids == asking.token_ids  # ...and leaves it cached
    assert first.num_cached_tokens == 0
    assert_pool_idle(engine)


def test_prompt_logprobs_survive_preemption(tiny_model_dir):
    path, model = tiny_model_dir
    prompts = prompts_of(model.config.vocab_size, (5, 33, 64, 90, 120, 17), seed=2)
    # 12 blocks of 16 tokens: too few for every prompt at once, so requests are preempted and recomputed.
    engine = Engine(model=str(path), dtype="float32", kv_cache_bytes=12 * 8192, max_num_batched_tokens=64)
    params = SamplingParams(temperature=0, max_tokens=24, prompt_logprobs=NUM_TOP)
    outputs = run_engine(engine, prompts, params)
    assert sum(o.metrics.preemptions for o in outputs) > 0
    for prompt, out in zip(prompts, outputs):
        assert_prompt_logprobs(model, prompt, out.prompt_logprobs)
        assert out.token_ids == hf_greedy(model, prompt, 24)
    assert_pool_idle(engine)


def test_prompt_logprobs_with_ngram_speculation(tiny_model_dir):
    path, model = tiny_model_dir
    prompts = [[7, 8, 9, 10, 11] * 8] + prompts_of(model.config.vocab_size, (30,), seed=3)
    engine = Engine(model=str(path), dtype="float32", max_num_batched_tokens=16, speculative="ngram",
                    num_speculative_tokens=3, adaptive_speculation=False)
    params = SamplingParams(temperature=0, max_tokens=16, prompt_logprobs=0)
    outputs = run_engine(engine, prompts, params)
    for prompt, out in zip(prompts, outputs):
        assert_prompt_logprobs(model, prompt, out.prompt_logprobs, num_top=0)
        assert out.token_ids == hf_greedy(model, prompt, 16)
    assert sum(o.metrics.draft_tokens for o in outputs) > 0


def test_truncate_prompt_tokens_keeps_the_last_ones(tiny_model_dir):
    path, model = tiny_model_dir
    llm = LLM(str(path), dtype="float32")
    prompt = prompts_of(model.config.vocab_size, (40,), seed=4)[0]
    (whole,) = llm.generate(prompt[-8:], PLAIN)
    (cut,) = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, truncate_prompt_tokens=8))
    assert cut.prompt_token_ids == prompt[-8:] and cut.token_ids == whole.token_ids
    (longest,) = llm.generate([1] * (llm.engine.max_model_len + 5),
                              SamplingParams(max_tokens=1, truncate_prompt_tokens=-1))
    assert len(longest.prompt_token_ids) == llm.engine.max_model_len - 1


@pytest.mark.parametrize("max_tokens", [None, 4])
def test_truncate_prompt_tokens_minus_one_leaves_room_for_max_tokens(tiny_model_dir, max_tokens):
    path, _ = tiny_model_dir
    llm = LLM(str(path), dtype="float32", max_model_len=64)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, truncate_prompt_tokens=-1)
    (out,) = llm.generate(list(range(1, 101)), params)
    room = max_tokens or 1
    assert out.prompt_token_ids == list(range(1, 101))[-(64 - room):]
    assert len(out.token_ids) == room and out.finish_reason == "length"
    with pytest.raises(ValueError, match="max_tokens 64 plus the prompt's 1 tokens exceeds max_model_len 64"):
        llm.generate([1, 2, 3], SamplingParams(max_tokens=64, truncate_prompt_tokens=-1))


def test_a_logit_bias_outside_the_vocabulary_is_refused_naming_the_field(tiny_model_dir):
    path, _ = tiny_model_dir
    engine = Engine(model=str(path), dtype="float32")
    with pytest.raises(ValueError, match="logit_bias: token id 512 is outside the vocabulary"):
        engine.add_request(None, SamplingParams(logit_bias={512: 1.0}), prompt_token_ids=[1, 2])
