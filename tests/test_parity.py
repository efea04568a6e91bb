"""Invariant 1: greedy output is token-identical to transformers' generate(), whatever the batch."""

from __future__ import annotations

import random

import pytest

from scheduler import Engine, SamplingParams
from tests.conftest import hf_greedy, save_tiny_model, tiny_config
from tests.helpers import assert_pool_idle, run_engine

PROMPT_LENS = (1, 5, 16, 17, 33, 64, 90, 120)
MAX_TOKENS = 24


def random_prompts(vocab_size: int, lengths=PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths]


def hf_references(model, prompts, max_tokens=MAX_TOKENS):
    return [hf_greedy(model, p, max_tokens) for p in prompts]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    path, model = tiny_model_dir
    prompts = random_prompts(model.config.vocab_size)
    return path, prompts, hf_references(model, prompts)


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)

SCENARIOS = {
    "one_batch": dict(engine={}, arrive_every=0),
    "continuous_batching": dict(engine={}, arrive_every=3),
    "chunked_prefill": dict(engine=dict(max_num_batched_tokens=16), arrive_every=1),
    # 12 blocks of 16 tokens: too few for all eight prompts at once, so the scheduler must preempt.
    "preemption": dict(engine=dict(kv_cache_bytes=12 * 8192, max_num_batched_tokens=64), arrive_every=0),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_tiny_model_matches_hf(tiny, scenario):
    path, prompts, expected = tiny
    setup = SCENARIOS[scenario]
    engine = Engine(model=str(path), dtype="float32", **setup["engine"])
    outputs = run_engine(engine, prompts, GREEDY, arrive_every=setup["arrive_every"])
    assert [o.token_ids for o in outputs] == expected
    assert all(o.finish_reason == "length" for o in outputs)
    if scenario == "preemption":
        assert sum(o.metrics.preemptions for o in outputs) > 0
    assert_pool_idle(engine)


def test_prefix_cache_hits_keep_outputs_exact(tiny_model_dir):
    path, model = tiny_model_dir
    rng = random.Random(1)
    shared = [rng.randrange(model.config.vocab_size) for _ in range(70)]
    prompts = [shared + [rng.randrange(model.config.vocab_size) for _ in range(n)] for n in (1, 9, 30, 47)]
    expected = hf_references(model, prompts)
    engine = Engine(model=str(path), dtype="float32")
    first = run_engine(engine, prompts[:1], GREEDY)
    rest = run_engine(engine, prompts[1:], GREEDY, arrive_every=2)
    assert [o.token_ids for o in first + rest] == expected
    assert all(o.num_cached_tokens >= 64 for o in rest)  # the 4 full blocks of the shared prefix
    assert engine.pool.prefix_hit_tokens > 0
    assert_pool_idle(engine)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
def test_other_architectures_match_hf(tmp_path, arch):
    config = tiny_config(arch)
    model = save_tiny_model(tmp_path, config, seed=3)
    prompts = random_prompts(config.vocab_size, lengths=(3, 20, 45), seed=len(arch))
    engine = Engine(model=str(tmp_path), dtype="float32", max_num_batched_tokens=32)
    outputs = run_engine(engine, prompts, SamplingParams(temperature=0, max_tokens=12), arrive_every=1)
    assert [o.token_ids for o in outputs] == hf_references(model, prompts, 12)


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="gpt2.*supported: LlamaForCausalLM"):
        Engine(model=str(tmp_path))
