"""logit_bias on the engine: it changes what greedy picks, and speculation (n-gram or a draft model) picks the
same tokens as plain decoding under it, since verification computes the target's probabilities with it too."""

from __future__ import annotations

import random

import torch

from scheduler import Engine, SamplingParams
from tests.helpers import assert_pool_idle, run_engine

MAX_TOKENS = 24


def prompts_of(vocab_size: int) -> list[list[int]]:
    rng = random.Random(7)
    prompts = [[rng.randrange(vocab_size) for _ in range(n)] for n in (1, 9, 30, 70)]
    return prompts + [[7, 8, 9, 10, 11] * 12, prompts[2] * 3]  # n-gram lookups find these


def hf_biased_greedy(model, prompt: list[int], bias: dict[int, float]) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0,
                         sequence_bias={(t,): b for t, b in bias.items()})
    return out[0, len(prompt):].tolist()


def test_minus_100_bans_the_greedy_pick_and_plus_100_forces_one(tiny_model_dir):
    path, model = tiny_model_dir
    engine = Engine(model=str(path), dtype="float32")
    prompts = prompts_of(model.config.vocab_size)
    plain = run_engine(engine, prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    for prompt, out in zip(prompts, plain):
        banned = out.token_ids[0]
        (biased,) = run_engine(engine, [prompt], SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                                logit_bias={banned: -100}))
        assert banned not in biased.token_ids and biased.token_ids[0] != banned
        assert biased.token_ids == hf_biased_greedy(model, prompt, {banned: -100.0})
    (forced,) = run_engine(engine, prompts[:1], SamplingParams(temperature=0, max_tokens=8, logit_bias={42: 100}))
    assert forced.token_ids == [42] * 8
    assert_pool_idle(engine)


def biased_cases(engine: Engine, prompts: list[list[int]]) -> list[SamplingParams]:
    """Per prompt: ban the token it would write most, lift a few others, so its output changes."""
    plain = run_engine(engine, prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    cases = []
    for out in plain:
        frequent = max(set(out.token_ids), key=out.token_ids.count)
        cases.append(SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                    logit_bias={frequent: -100, 3: 4.0, 300: 2.5, out.token_ids[-1]: 1.5}))
    return cases


def test_ngram_speculation_picks_the_same_tokens_under_logit_bias(tiny_model_dir):
    path, model = tiny_model_dir
    prompts = prompts_of(model.config.vocab_size)
    off = Engine(model=str(path), dtype="float32", max_num_batched_tokens=32)
    cases = biased_cases(off, prompts)
    expected = run_engine(off, prompts, cases)
    assert [o.token_ids for o in expected] == [hf_biased_greedy(model, p, c.logit_bias)
                                               for p, c in zip(prompts, cases)]
    engine = Engine(model=str(path), dtype="float32", max_num_batched_tokens=32, speculative="ngram",
                    num_speculative_tokens=3, adaptive_speculation=False)
    outputs = run_engine(engine, prompts, cases, arrive_every=1)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
    assert sum(o.metrics.accepted_tokens for o in outputs) > 0
    assert_pool_idle(engine)


def test_a_draft_model_drafts_under_the_same_logit_bias(tiny_model_dir):
    """The target as its own draft: with the bias in both the draft's and the target's probabilities, every
    draft is accepted, and the output is the unspeculated one."""
    path, model = tiny_model_dir
    prompts = prompts_of(model.config.vocab_size)
    off = Engine(model=str(path), dtype="float32")
    cases = biased_cases(off, prompts)
    expected = run_engine(off, prompts, cases)
    engine = Engine(model=str(path), dtype="float32", speculative="draft", draft_model=str(path),
                    num_speculative_tokens=3, adaptive_speculation=False)
    outputs = run_engine(engine, prompts, cases)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
    drafted = sum(o.metrics.draft_tokens for o in outputs)
    assert drafted > 0 and sum(o.metrics.accepted_tokens for o in outputs) == drafted
    assert_pool_idle(engine)
