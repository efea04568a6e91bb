"""Overlapped scheduling: the tokens of the synchronous loop and of transformers, never a token past a stop,
aborts and stops within one step, every block back; the flag turns it off."""

from __future__ import annotations

import random

import pytest

from scheduler import LLM, Engine, SamplingParams
from tests.conftest import hf_greedy, save_tiny_model, tiny_config
from tests.helpers import assert_pool_idle, run_engine
from tests.test_parity import SCENARIOS  # one batch, continuous batching, chunked prefill, preemption

PROMPT_LENS = (1, 5, 16, 17, 33, 64, 90)
MAX_TOKENS = (24, 3, 1, 17, 9, 24, 12)
BOTH = (True, False)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny model, prompts of mixed lengths, and what transformers makes of each at its own max_tokens."""
    path, model = tiny_model_dir
    rng = random.Random(17)
    prompts = [[rng.randrange(model.config.vocab_size) for _ in range(n)] for n in PROMPT_LENS]
    return path, model, prompts, [hf_greedy(model, p, m) for p, m in zip(prompts, MAX_TOKENS)]


def engine(path, overlap: bool, **kwargs) -> Engine:
    return Engine(model=str(path), dtype="float32", overlap_scheduling=overlap, **kwargs)


def assert_overlapped(engine: Engine, overlap: bool) -> None:
    """The flag decides which loop ran: some steps overlapped when on, none when off."""
    assert (engine.num_overlapped_steps > 0) == overlap


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("overlap", BOTH)
def test_greedy_matches_transformers_with_overlap_on_and_off(tiny, scenario, overlap):
    path, _, prompts, expected = tiny
    setup = SCENARIOS[scenario]
    eng = engine(path, overlap, **setup["engine"])
    outputs = run_engine(eng, prompts, [greedy(m) for m in MAX_TOKENS], arrive_every=setup["arrive_every"])
    assert [o.token_ids for o in outputs] == expected
    assert all(o.finish_reason == "length" for o in outputs)
    if scenario == "preemption":
        assert sum(o.metrics.preemptions for o in outputs) > 0
    assert_overlapped(eng, overlap)
    assert_pool_idle(eng)


@pytest.mark.parametrize("overlap", BOTH)
def test_stop_token_ids_end_requests_on_the_stop_and_no_later(tiny, overlap):
    """The step after a stop token is computed before the host sees the stop; its token is never output."""
    path, _, prompts, expected = tiny
    long = [(p, e) for p, e in zip(prompts, expected) if len(e) >= 9]
    params = [greedy(24, stop_token_ids=[e[k]]) for k, (_, e) in enumerate(long)]
    eng = engine(path, overlap)
    outputs = run_engine(eng, [p for p, _ in long], params)
    for out, (_, want), q in zip(outputs, long, params):
        stop_id = q.stop_token_ids[0]
        assert out.token_ids == want[:want.index(stop_id) + 1]
        assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)
    assert_overlapped(eng, overlap)
    assert_pool_idle(eng)


@pytest.mark.parametrize("overlap", BOTH)
def test_no_step_runs_past_max_tokens(tiny, overlap):
    """The host knows how many tokens are in flight: a request whose last one is computing is not scheduled
    again, so it computes what the synchronous loop does, its prompt and every output token but the last."""
    path, _, prompts, _ = tiny
    eng = engine(path, overlap)
    eng.add_request(None, greedy(10), prompt_token_ids=prompts[3])
    computed = 0
    while eng.has_unfinished():
        eng.step()
        computed += eng.last_step_stats.num_batched_tokens
    assert computed == len(prompts[3]) + 10 - 1
    assert_overlapped(eng, overlap)
    assert_pool_idle(eng)


@pytest.mark.parametrize("overlap", BOTH)
def test_eos_ends_requests_on_it(tiny_model_dir, tmp_path, overlap):
    path, model = tiny_model_dir
    prompt = [5, 6, 7, 8]
    base = hf_greedy(model, prompt, 20)
    config = tiny_config(eos_token_id=base[4])  # the same weights, EOS the token greedy decoding writes fifth
    save_tiny_model(tmp_path, config)
    eng = engine(tmp_path, overlap)
    stopped, ignored = run_engine(eng, [prompt, prompt], [greedy(20), greedy(20, ignore_eos=True)])
    assert stopped.token_ids == base[:base.index(base[4]) + 1] and stopped.finish_reason == "stop"
    assert ignored.token_ids == base and ignored.finish_reason == "length"
    assert_pool_idle(eng)


def test_stop_strings_cut_the_same_text_with_overlap_on_and_off(tiny_text_model_dir):
    path, _ = tiny_text_model_dir
    prompts = ["The quick brown fox", "Once upon a time, in a land far away,", "Numbers: 1 2 3"]
    results = {}
    for overlap in BOTH:
        llm = LLM(str(path), max_num_batched_tokens=64, overlap_scheduling=overlap)
        base = llm.generate(prompts, greedy(30, ignore_eos=True))
        # A stop string made of the end of one token and the start of the next, a different place for each.
        stops = []
        for k, out in enumerate(base):
            left, right = (llm.tokenizer.decode([t]) for t in out.token_ids[4 + 3 * k:6 + 3 * k])
            stops.append(left[-2:] + right[:2])
        outs = llm.generate(prompts, [greedy(30, stop=[stop], ignore_eos=True) for stop in stops])
        for out, whole, stop in zip(outs, base, stops):
            assert out.finish_reason == "stop" and out.stop_reason == stop
            assert out.text == whole.text[:whole.text.index(stop)]
        results[overlap] = [(o.token_ids, o.text) for o in base + outs]
        assert_overlapped(llm.engine, overlap)
        assert_pool_idle(llm.engine)
    assert results[True] == results[False]


@pytest.mark.parametrize("overlap", BOTH)
def test_aborts_end_requests_at_the_next_step_with_what_was_sent(tiny, overlap):
    path, _, prompts, _ = tiny
    eng = engine(path, overlap, max_num_seqs=3)
    streams = [eng.add_request(None, greedy(30), prompt_token_ids=p) for p in prompts[:5]]
    received = {s.request_id: [] for s in streams}

    def drain():
        for s in streams:
            while (delta := s.get_nowait()) is not None:
                received[s.request_id].append(delta)

    for _ in range(6):
        eng.step()
    drain()
    running, waiting = streams[0], streams[4]
    assert received[running.request_id] and not received[waiting.request_id]
    assert eng.abort(running.request_id) and eng.abort(waiting.request_id)
    eng.step()
    drain()
    for s in (running, waiting):
        assert s.finished and received[s.request_id][-1].finish_reason == "abort"
    while eng.has_unfinished():
        eng.step()
    drain()
    for s, prompt in zip(streams, prompts):
        tokens = [t for d in received[s.request_id] for t in d.token_ids]
        assert tokens == hf_greedy(tiny[1], prompt, 30)[:len(tokens)]  # what was sent is right, nothing after
        assert sum(d.finished for d in received[s.request_id]) == 1
        if s not in (running, waiting):
            assert len(tokens) == 30
    assert not received[waiting.request_id][-1].token_ids
    assert_pool_idle(eng)


@pytest.mark.parametrize("overlap", BOTH)
def test_requests_that_cannot_overlap_make_their_steps_synchronous_and_agree(tiny, overlap):
    """Penalties and prompt logprobs need the host to know every token: while such a request runs, steps
    are synchronous; once they are done, the plain ones overlap again."""
    path, _, prompts, _ = tiny
    special = [greedy(6, repetition_penalty=1.3), greedy(6, min_tokens=4), greedy(6, logprobs=2),
               greedy(6, prompt_logprobs=1)]
    params = special + [greedy(20)] * 3
    eng = engine(path, overlap)
    outputs = run_engine(eng, prompts, params)
    reference = run_engine(engine(path, False), prompts, params)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in reference]
    assert [len(o.logprobs) for o in outputs[2:3]] == [6] and outputs[3].prompt_logprobs is not None
    assert_overlapped(eng, overlap)
    assert eng.num_overlapped_steps < 20
    assert_pool_idle(eng)


@pytest.mark.parametrize("overlap", BOTH)
def test_min_tokens_holds_stops_back_by_the_count_of_tokens_in_flight_too(tiny, overlap):
    """The first output min_tokens lets stop is the one after min_tokens outputs, those in flight counted:
    here it is the stop token greedy decoding writes there."""
    path, _, prompts, expected = tiny
    cases = []
    for prompt, want in zip(prompts, expected):
        at = next((m for m in range(2, len(want)) if want[m] not in want[:m]), None)
        if at is not None:
            cases.append((prompt, greedy(24, stop_token_ids=[want[at]], min_tokens=at), want[:at + 1]))
    assert len(cases) >= 3
    eng = engine(path, overlap)
    outputs = run_engine(eng, [p for p, _, _ in cases], [q for _, q, _ in cases])
    assert [o.token_ids for o in outputs] == [want for _, _, want in cases]
    assert all(o.finish_reason == "stop" for o in outputs)
    assert_overlapped(eng, overlap)
    assert_pool_idle(eng)


def test_logprobs_travel_with_their_tokens_and_every_step_overlaps(tiny):
    path, _, prompts, _ = tiny
    params = [SamplingParams(temperature=[0, 1.0][i % 2], seed=i, max_tokens=m, logprobs=[1, 3, 0][i % 3],
                             ignore_eos=True) for i, m in enumerate(MAX_TOKENS)]
    eng = engine(path, True)
    outputs, steps = [], 0
    streams = [eng.add_request(None, q, prompt_token_ids=p) for p, q in zip(prompts, params)]
    while eng.has_unfinished():
        eng.step()
        steps += eng.last_step_stats.num_batched_tokens > 0
    assert eng.num_overlapped_steps == steps
    for s in streams:
        outputs.append([lp for d in iter(s.get_nowait, None) for lp in (d.logprobs or [])])
    reference = run_engine(engine(path, False), prompts, params)
    assert outputs == [o.logprobs or [] for o in reference]
    assert [len(lps) for lps in outputs] == [m if q.logprobs else 0 for m, q in zip(MAX_TOKENS, params)]
    assert_pool_idle(eng)


@pytest.mark.parametrize("overlap", BOTH)
def test_seeded_sampling_draws_the_same_tokens_with_overlap_on_and_off(tiny, overlap):
    path, _, prompts, _ = tiny
    params = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=m, ignore_eos=True,
                             top_k=[0, 20][i % 2], top_p=[1.0, 0.9][i % 3 == 0], logit_bias={7: 2.0} if i == 3 else {})
              for i, m in enumerate(MAX_TOKENS)]
    eng = engine(path, overlap, max_num_batched_tokens=32)
    outputs = run_engine(eng, prompts, params, arrive_every=1)
    reference = run_engine(engine(path, False, max_num_batched_tokens=32), prompts, params, arrive_every=1)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in reference]
    assert [len(o.token_ids) for o in outputs] == list(MAX_TOKENS)
    assert_overlapped(eng, overlap)
    assert_pool_idle(eng)


SPECULATION = {
    "ngram": lambda path: dict(speculative="ngram", adaptive_speculation=False),
    # Drafts verified on the device inside the loop (speculative/loop.py).
    "ngram_in_loop": lambda path: dict(speculative="ngram", adaptive_speculation=False, speculation_in_loop=True),
    "draft": lambda path: dict(speculative="draft", draft_model=str(path), adaptive_speculation=False),
    # The measured depth comes and goes: drafting steps and overlapped steps take turns.
    "draft_adaptive": lambda path: dict(speculative="draft", draft_model=str(path)),
}


@pytest.mark.parametrize("mode", SPECULATION)
@pytest.mark.parametrize("overlap", BOTH)
def test_speculation_keeps_greedy_exact_and_its_steps_overlap(tiny, mode, overlap):
    """Steps with drafts are verified before the next is scheduled, but their stop checks run while the next
    runs: every step with work is launched before the host has finished the one before. Half the requests
    end on a stop token, which a draft may run past."""
    path, model, prompts, expected = tiny
    prompts = prompts + [[7, 8, 9, 10, 11] * 12]  # n-gram lookups find this one
    expected = expected + [hf_greedy(model, prompts[-1], 24)]
    params, wanted = [], []
    for i, (m, want) in enumerate(zip(MAX_TOKENS + (24,), expected)):
        stop = [want[len(want) // 2]] if i % 2 else []
        params.append(greedy(m, stop_token_ids=stop))
        wanted.append(want[:want.index(stop[0]) + 1] if stop else want)
    eng = engine(path, overlap, kv_cache_bytes=14 * 2 * 8192, max_num_batched_tokens=32, num_speculative_tokens=3,
                 **SPECULATION[mode](path))
    steps = 0
    streams = [eng.add_request(None, q, prompt_token_ids=p) for p, q in zip(prompts, params)]
    while eng.has_unfinished():
        eng.step()
        steps += eng.last_step_stats.num_batched_tokens > 0
    deltas = [list(iter(s.get_nowait, None)) for s in streams]
    assert [[t for d in ds for t in d.token_ids] for ds in deltas] == wanted
    assert sum(ds[-1].metrics.draft_tokens for ds in deltas) > 0
    assert eng.num_overlapped_steps == (steps if overlap else 0)
    assert_pool_idle(eng)


@pytest.mark.parametrize("overlap", BOTH)
def test_parallel_samples_with_overlap_on_and_off(tiny_model_dir, overlap):
    path, model = tiny_model_dir
    prompt = list(range(3, 68))
    llm = LLM(str(path), max_num_batched_tokens=128, kv_cache_bytes=64 << 20, overlap_scheduling=overlap)
    (four,) = llm.generate([prompt], greedy(12, n=4))
    assert [c.token_ids for c in four.outputs] == [hf_greedy(model, prompt, 12)] * 4
    seeded = SamplingParams(temperature=1.0, max_tokens=16, n=4, seed=7)
    (sampled,) = llm.generate([prompt], seeded)
    singles = llm.generate([prompt] * 4, [SamplingParams(temperature=1.0, max_tokens=16, seed=7 + i)
                                          for i in range(4)])
    assert [c.token_ids for c in sampled.outputs] == [s.token_ids for s in singles]
    assert_overlapped(llm.engine, overlap)
    assert_pool_idle(llm.engine)
