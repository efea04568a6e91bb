"""n parallel samples of one prompt: n sequences that share the prompt's KV blocks, each with its own random
stream, scheduled, preempted and aborted as one request."""

from __future__ import annotations

import pytest

from scheduler import LLM, Engine, SamplingParams
from tests.helpers import assert_pool_idle

PROMPT = list(range(3, 68))  # 65 tokens: four full blocks of 16 and one token more
KV = 64 << 20  # a KV cache of its own size, so several engines fit one GPU where these tests run on one


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir[0]), max_num_batched_tokens=128, kv_cache_bytes=KV)


def texts(result) -> list[list[int]]:
    return [c.token_ids for c in result.outputs]


def test_greedy_completions_are_all_the_single_answer(llm):
    (single,) = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12))
    (four,) = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, n=4))
    assert [c.index for c in four.outputs] == [0, 1, 2, 3]
    assert texts(four) == [single.token_ids] * 4
    assert four.token_ids == single.token_ids and four.outputs[0] is four  # n = 1's fields still read the same
    assert all(c.finish_reason == "length" for c in four.outputs)
    assert_pool_idle(llm.engine)


def test_seeded_completions_are_reproducible_differ_and_each_is_its_seed_plus_index(llm):
    params = SamplingParams(temperature=1.0, max_tokens=16, n=4, seed=7)
    (first,) = llm.generate([PROMPT], params)
    (again,) = llm.generate([PROMPT], params)
    assert texts(first) == texts(again)
    assert len({tuple(t) for t in texts(first)}) == 4
    singles = llm.generate([PROMPT] * 4, [SamplingParams(temperature=1.0, max_tokens=16, seed=7 + i)
                                          for i in range(4)])
    assert texts(first) == [s.token_ids for s in singles]


def test_the_prompt_is_held_once_not_n_times(tiny_model_dir):
    engine = Engine(model=str(tiny_model_dir[0]), max_num_batched_tokens=128, kv_cache_bytes=KV)
    stream = engine.add_request(None, SamplingParams(temperature=1.0, max_tokens=40, n=4, seed=1),
                                prompt_token_ids=PROMPT)
    for _ in range(4):
        engine.step()
    completions = sorted(engine._groups[stream.request_id], key=lambda live: live.request.index)
    tables = [engine.pool.req_blocks[live.request.request_id] for live in completions]  # by sequence id
    shared = tables[0][:4]
    assert all(t[:4] == shared for t in tables)  # the same four blocks ...
    assert [b.ref_cnt for b in shared] == [4] * 4  # ... held by all four completions
    assert len({b.block_id for t in tables for b in t[4:]}) == sum(len(t) - 4 for t in tables)  # the rest are theirs
    assert engine.pool.num_used_blocks == 4 + sum(len(t) - 4 for t in tables)
    while not stream.finished:
        engine.step()
    assert_pool_idle(engine)


def test_abort_ends_all_n_and_returns_every_block(tiny_model_dir):
    engine = Engine(model=str(tiny_model_dir[0]), max_num_batched_tokens=128, kv_cache_bytes=KV)
    stream = engine.add_request(None, SamplingParams(temperature=1.0, max_tokens=400, n=4, ignore_eos=True),
                                prompt_token_ids=PROMPT, request_id="many")
    for _ in range(3):
        engine.step()
    assert engine.abort("many")
    engine.step()
    ends = []
    while (output := stream.get_nowait()) is not None:
        ends += [output.index] if output.finished else []
        assert output.request_id == "many"
    assert sorted(ends) == [0, 1, 2, 3] and stream.finished
    assert_pool_idle(engine)


def test_abort_before_the_siblings_start_ends_them_too(tiny_model_dir):
    # A 16-token step budget: the prompt takes five steps.
    engine = Engine(model=str(tiny_model_dir[0]), max_num_batched_tokens=16, kv_cache_bytes=KV)
    stream = engine.add_request(None, SamplingParams(temperature=0, max_tokens=4, n=3), prompt_token_ids=PROMPT,
                                request_id="early")
    engine.step()
    assert engine.abort("early")
    engine.step()
    assert stream.finished
    assert_pool_idle(engine)


def test_preemption_keeps_the_siblings_shared_blocks_and_the_answers(tiny_model_dir):
    roomy = LLM(str(tiny_model_dir[0]), max_num_batched_tokens=128, kv_cache_bytes=KV)
    block_bytes = 2 * 2 * 2 * 16 * 4 * 16  # layers x (k, v) x kv heads x head dim x fp32 x tokens
    tight = LLM(str(tiny_model_dir[0]), max_num_batched_tokens=128, kv_cache_bytes=24 * block_bytes)
    params = [SamplingParams(temperature=0, max_tokens=60, n=3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=60, n=2, ignore_eos=True)]
    prompts = [PROMPT, PROMPT[::-1]]
    want = roomy.generate(prompts, params)
    got = tight.generate(prompts, params)
    assert tight.engine.scheduler.running == [] and sum(
        c.metrics.preemptions for r in got for c in r.outputs) > 0  # the pool was too small for all at once
    assert [texts(r) for r in got] == [texts(r) for r in want]
    assert_pool_idle(tight.engine)


@pytest.mark.parametrize("n", [0, 17, 2.0, True])
def test_n_out_of_range_names_the_field(n):
    with pytest.raises(ValueError, match=r"^n must be an integer in \[1, 16\]"):
        SamplingParams(n=n)


def test_each_of_n_completions_matches_the_grammar_on_its_own(tiny_text_model_dir):
    from scheduler import StructuredOutputsParams

    llm = LLM(str(tiny_text_model_dir[0]), kv_cache_bytes=KV)
    choices = ["yes", "no", "maybe later"]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=8, n=6,
                            structured_outputs=StructuredOutputsParams(choice=choices))
    (result,) = llm.generate(["Answer:"], params)
    assert len(result.outputs) == 6 and all(c.text in choices and c.finish_reason == "stop" for c in result.outputs)
    assert_pool_idle(llm.engine)
