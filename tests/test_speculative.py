"""Speculative decoding: greedy outputs unchanged, sampling lossless, pools clean, bad drafts refused."""

from __future__ import annotations

import math
import random

import pytest
import torch

from scheduler import Engine, SamplingParams
from scheduler.core.request import Request
from scheduler.core.scheduler import ScheduledRequest
from scheduler.sampling.sampler import Sampler
from scheduler.speculative.depth import AdaptiveDepth
from scheduler.speculative.draft import compact
from scheduler.speculative.ngram import NgramProposer, propose_ngram
from scheduler.speculative.speculator import Speculator
from tests.conftest import hf_greedy, save_tiny_model, tiny_config
from tests.helpers import assert_pool_idle, run_engine

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """Target, an unrelated random draft with the same vocabulary, prompts (one repetitive), HF outputs."""
    path, model = tiny_model_dir
    other = tmp_path_factory.mktemp("other-draft")
    save_tiny_model(other, tiny_config(num_hidden_layers=1), seed=11)
    rng = random.Random(5)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (1, 9, 30, 70, 100)]
    prompts += [[7, 8, 9, 10, 11] * 12, prompts[2] * 3]  # n-gram lookups find these
    expected = [hf_greedy(model, p, MAX_TOKENS) for p in prompts]
    return path, other, prompts, expected


MODES = {
    "draft_is_target": lambda path, other: dict(speculative="draft", draft_model=str(path)),
    "random_draft": lambda path, other: dict(speculative="draft", draft_model=str(other)),
    "ngram": lambda path, other: dict(speculative="ngram"),
}


@pytest.mark.parametrize("mode", MODES)
def test_greedy_is_unchanged_with_chunking_and_preemption(setup, mode):
    path, other, prompts, expected = setup
    # 14 blocks and 32-token steps: prompts are chunked and sequences preempted while speculating.
    engine = Engine(model=str(path), dtype="float32", kv_cache_bytes=14 * 2 * 8192, max_num_batched_tokens=32,
                    num_speculative_tokens=3, adaptive_speculation=False, **MODES[mode](path, other))
    outputs = run_engine(engine, prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), arrive_every=1)
    assert [o.token_ids for o in outputs] == expected
    drafted = sum(o.metrics.draft_tokens for o in outputs)
    accepted = sum(o.metrics.accepted_tokens for o in outputs)
    assert drafted > 0 and sum(o.metrics.preemptions for o in outputs) > 0
    if mode == "draft_is_target":
        assert accepted == drafted  # a model always agrees with itself
    if mode == "random_draft":
        assert accepted < drafted / 2
    if mode == "ngram":
        assert accepted > 0
    assert_pool_idle(engine)


def test_penalties_and_min_tokens_see_the_drafts_before_each_verified_position(setup):
    """Greedy with penalties goes through the sampling path: each verified position must be penalised
    for the drafts before it, and min_tokens must block a stop token at every position it covers."""
    path, _, prompts, _ = setup
    off = Engine(model=str(path), dtype="float32")
    plain = run_engine(off, prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    tokens = [t for o in plain for t in o.token_ids]
    frequent = max(set(tokens), key=tokens.count)  # it stops requests once min_tokens allows
    cases = []
    for prompt, out in zip(prompts, plain):
        cases += [(prompt, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, repetition_penalty=1.5,
                                          presence_penalty=0.7)),
                  (prompt, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, frequency_penalty=0.8)),
                  # The token it would write second, blocked: first verified in a speculative step.
                  (prompt, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, min_tokens=12,
                                          stop_token_ids=[out.token_ids[1], frequent]))]
    expected = [o.token_ids for o in run_engine(off, [p for p, _ in cases], [q for _, q in cases])]
    engine = Engine(model=str(path), dtype="float32", speculative="draft", draft_model=str(path),
                    num_speculative_tokens=4, adaptive_speculation=False)
    outputs = run_engine(engine, [p for p, _ in cases], [q for _, q in cases])
    assert [o.token_ids for o in outputs] == expected
    assert sum(o.metrics.accepted_tokens for o in outputs) > 0
    stopped = [o for o, (_, q) in zip(outputs, cases) if q.min_tokens and o.finish_reason == "stop"]
    assert stopped and all(len(o.token_ids) >= 12 for o in stopped)
    assert_pool_idle(engine)


def test_requests_with_and_without_speculation_share_a_batch(setup):
    path, _, prompts, expected = setup
    engine = Engine(model=str(path), dtype="float32", speculative="draft", draft_model=str(path),
                    num_speculative_tokens=4, adaptive_speculation=False)
    streams = [engine.add_request(None, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), prompt_token_ids=p,
                                  speculative=i % 3 != 0, max_draft_tokens=2 if i % 3 == 1 else None)
               for i, p in enumerate(prompts)]
    while engine.has_unfinished():
        stats = engine.step().__len__() and engine.last_step_stats
        if stats and stats.accepted_per_position:
            assert len(stats.accepted_per_position) <= 4
    finals = [[d for d in iter(s.get_nowait, None)] for s in streams]
    for i, (deltas, want) in enumerate(zip(finals, expected)):
        assert [t for d in deltas for t in d.token_ids] == want
        metrics = deltas[-1].metrics
        if i % 3 == 0:
            assert metrics.draft_tokens == 0
        else:
            assert metrics.draft_tokens > 0 and metrics.accepted_tokens == metrics.draft_tokens
    assert_pool_idle(engine)


def _reference_joint(model, prompt, vocab, temperature, top_p, length):
    """Exact probability of every continuation of `length` tokens under the target's sampling rule."""
    def dist(prefixes):
        with torch.no_grad():
            logits = model(torch.tensor(prefixes)).logits[:, -1].float() / temperature
        probs = logits.softmax(-1)
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set reaching top_p
        kept = torch.zeros_like(probs).scatter_(1, idx, sorted_p * keep)
        return kept / kept.sum(-1, keepdim=True)

    joint = {(): 1.0}
    for _ in range(length):
        prefixes = list(joint)
        probs = dist([prompt + list(p) for p in prefixes])
        joint = {p + (t,): joint[p] * probs[i, t].item() for i, p in enumerate(prefixes) for t in range(vocab)}
    return joint


def _chi_square_critical(dof: int, z: float = 3.72) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at p = 1e-4 (z = 3.72)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("top_p, draft_vocab", [(1.0, None), (0.8, None), (1.0, [0, 2, 4])])
def test_sampling_with_speculation_keeps_the_target_distribution(tmp_path, top_p, draft_vocab):
    """draft_vocab: the draft proposes only these tokens (its LM head is restricted to them)."""
    vocab = 5
    target_dir, draft_dir = tmp_path / "target", tmp_path / "draft"
    target = save_tiny_model(target_dir, tiny_config(vocab_size=vocab), seed=1)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.05)  # a spread-out distribution, so many continuations matter
    target.save_pretrained(target_dir)
    save_tiny_model(draft_dir, tiny_config(vocab_size=vocab, num_hidden_layers=1), seed=2)
    if draft_vocab:
        compact.save_vocab(draft_dir, draft_vocab)
    prompt, length, samples = [1, 2, 3], 3, 6000
    engine = Engine(model=str(target_dir), dtype="float32", speculative="draft", draft_model=str(draft_dir),
                    num_speculative_tokens=2, adaptive_speculation=False, max_num_seqs=1024,
                    max_num_batched_tokens=8192)
    vocab_ids = engine.speculator.proposer.runner.model.vocab_ids
    assert (vocab_ids is None) == (draft_vocab is None)
    params = [SamplingParams(temperature=1.0, top_p=top_p, seed=i, max_tokens=length, ignore_eos=True)
              for i in range(samples)]
    outputs = run_engine(engine, [prompt] * samples, params)
    drafted = sum(o.metrics.draft_tokens for o in outputs)
    accepted = sum(o.metrics.accepted_tokens for o in outputs)
    assert 0 < accepted < drafted  # both acceptance and the residual path were exercised
    counts: dict[tuple, int] = {}
    for o in outputs:
        key = tuple(o.token_ids)
        counts[key] = counts.get(key, 0) + 1
    expected = _reference_joint(target, prompt, vocab, 1.0, top_p, length)
    assert set(counts) <= {k for k, p in expected.items() if p > 0}
    big = [k for k, p in expected.items() if p * samples >= 5]
    rest_p = 1 - sum(expected[k] for k in big)
    chi2 = sum((counts.get(k, 0) - samples * expected[k]) ** 2 / (samples * expected[k]) for k in big)
    rest = samples - sum(counts.get(k, 0) for k in big)
    if rest_p * samples >= 5:
        chi2 += (rest - samples * rest_p) ** 2 / (samples * rest_p)
    assert chi2 < _chi_square_critical(len(big)), f"chi2 {chi2:.1f} over {len(big)} cells"
    assert_pool_idle(engine)


def test_seeded_sampling_with_speculation_is_reproducible(setup):
    path, other, prompts, _ = setup
    params = SamplingParams(temperature=0.9, seed=42, max_tokens=MAX_TOKENS, ignore_eos=True)
    runs = []
    for batch in ([prompts[3]], prompts):
        engine = Engine(model=str(path), speculative="draft", draft_model=str(other), adaptive_speculation=False)
        runs.append(run_engine(engine, batch, params)[batch.index(prompts[3])].token_ids)
    assert runs[0] == runs[1]


def test_bad_drafts_are_refused_with_the_reason(tiny_model_dir, tmp_path):
    path, _ = tiny_model_dir
    save_tiny_model(tmp_path / "vocab", tiny_config(vocab_size=300))
    with pytest.raises(ValueError, match="draft_model: its vocabulary has 300 tokens, the target's 512"):
        Engine(model=str(path), speculative="draft", draft_model=str(tmp_path / "vocab"))
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=512).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="draft_model: unsupported architecture 'gpt2'"):
        Engine(model=str(path), speculative="draft", draft_model=str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match="draft_model: model must be"):
        Engine(model=str(path), speculative="draft", draft_model=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="needs draft_model"):
        Engine(model=str(path), speculative="draft")


def test_ngram_proposes_what_followed_the_latest_match():
    tokens = [1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 7, 2, 3]
    assert propose_ngram(tokens, 3, 2, 4) == [5, 6, 7]  # "2 3" last seen before 5 6 7
    assert propose_ngram(tokens + [5], 2, 2, 4) == [6, 7]  # longer tail "2 3 5" wins
    assert propose_ngram([1, 2, 3, 4], 3, 2, 4) == []
    assert propose_ngram([4, 4, 4], 5, 1, 2) == [4]
    # 256 then 0 holds the bytes of a 1 between them: a lookup matches whole tokens only.
    assert propose_ngram([256, 0, 7, 1], 3, 1, 1) == []
    assert propose_ngram([256, 0, 1, 7, 1], 3, 1, 1) == [7, 1]


def test_ngram_proposer_follows_a_growing_history():
    proposer = NgramProposer(n_min=2, n_max=4)
    rng = random.Random(3)
    request = Request("r", [rng.randrange(6) for _ in range(5)], SamplingParams())
    found = 0
    for _ in range(200):
        drafts = proposer.lookup(request, 4)
        assert drafts == propose_ngram(request.all_token_ids, 4, 2, 4)
        found += bool(drafts)
        request.append_token(rng.randrange(6))
    assert found > 100
    request.truncate_output(50)
    assert proposer.lookup(request, 4) == propose_ngram(request.all_token_ids, 4, 2, 4)


def _drive(depth: AdaptiveDepth, loads, step_seconds, acceptance: float, rng: random.Random,
           noise: float = 0.0) -> list[int]:
    """Runs depth over a simulated engine, one step per entry of loads (decoding sequences that step);
    step_seconds(b, k) is the step's time, scaled by Gaussian noise of that relative size. Returns the depths."""
    chosen = []
    for b in loads:
        k = depth.choose(b)
        chosen.append(k)
        depth.observe_step(b, k, step_seconds(b, k) * (rng.gauss(1.0, noise) if noise else 1.0))
        for _ in range(b):
            accepted = 0
            while accepted < k and rng.random() < acceptance:
                accepted += 1
            depth.observe_acceptance(k, accepted)
    return chosen


def _trained_depth(step_seconds, acceptance: float, num_decodes_seen=(1, 4, 16, 64)) -> AdaptiveDepth:
    """An AdaptiveDepth that has watched 400 steps of a simulated engine."""
    depth = AdaptiveDepth(k_max=4)
    _drive(depth, [num_decodes_seen[step % len(num_decodes_seen)] for step in range(400)], step_seconds, acceptance,
           random.Random(0))
    return depth


def test_adaptive_depth_speculates_when_steps_are_cheap_and_stops_under_load():
    # A launch-bound step: 20 ms whatever it carries, plus 0.1 ms per token.
    cheap = _trained_depth(lambda b, k: 0.020 + 0.0001 * b * (1 + k), acceptance=0.7)
    assert cheap.choose(num_decodes=1) >= 3
    # Compute-bound: every token costs 1 ms; half the first drafts accepted doesn't pay for them.
    loaded = _trained_depth(lambda b, k: 0.001 + 0.001 * b * (1 + k), acceptance=0.5)
    assert loaded.choose(num_decodes=64) == 0
    # Speculation overhead per sequence (proposing, verifying) counts even when tokens are cheap.
    overhead = _trained_depth(lambda b, k: 0.020 + 0.002 * b * (k > 0), acceptance=0.3)
    assert overhead.choose(num_decodes=64) == 0
    # A proposer that finds drafts for few sequences gains little even when they are accepted.
    sparse = _trained_depth(lambda b, k: 0.020 + 0.0005 * b * (1 + k), acceptance=0.9)
    assert sparse.choose(num_decodes=64) >= 1
    for _ in range(100):
        sparse.observe_coverage(5, 64)
    assert sparse.choose(num_decodes=64) == 0


def test_one_stalled_first_step_does_not_rule_a_depth_out():
    # Launch-bound steps where deep drafts pay; the first step drafting k_max stalls (a draft model
    # catching up on a whole prompt, a neighbour's burst) and costs ten times its due.
    stalled = []

    def step_seconds(b, k):
        first = k == 4 and not any(stalled)
        stalled.append(first)
        return (0.020 + 0.0005 * k) * (10 if first else 1)

    depth = AdaptiveDepth(k_max=4)
    chosen = _drive(depth, [1] * 200, step_seconds, acceptance=0.8, rng=random.Random(0))
    assert any(stalled) and chosen[-50:].count(4) > 40


@pytest.mark.parametrize("pays", [True, False])
def test_adaptive_depth_holds_its_choice_while_the_machine_drifts(pays):
    # Every step slows down by up to 60% and back over a few hundred steps (clocks, neighbours):
    # the best depth stays the best, so the choice must not follow the drift.
    def step_seconds(b, k):
        drift = 1 + 0.3 * (1 - math.cos(2 * math.pi * len(chosen) / 700))
        return drift * (0.010 + (0.0001 if pays else 0.008) * k + (0.0005 if k else 0))

    chosen = []
    depth = AdaptiveDepth(k_max=4)
    rng = random.Random(1)
    for _ in range(2100):
        k = depth.choose(8)
        chosen.append(k)
        depth.observe_step(8, k, step_seconds(8, k) * rng.gauss(1.0, 0.03))
        for _ in range(8):
            accepted = 0
            while accepted < k and rng.random() < 0.6:
                accepted += 1
            depth.observe_acceptance(k, accepted)
    best = 4 if pays else 0
    assert chosen[100:].count(best) > 0.9 * len(chosen[100:])


def test_adaptive_depth_weighs_steps_with_prompts_apart():
    # Decode steps replay cheap graphs; steps with a prompt chunk cost 10 ms and 1 ms more per draft token
    # of each sequence: the same load drafts deep without prompts and not at all with them.
    depth = AdaptiveDepth(k_max=4)
    rng = random.Random(0)
    for step in range(600):
        prefill = step % 3 == 0
        k = depth.choose(16, prefill)
        depth.observe_step(16, k, (0.010 + 0.001 * 16 * k if prefill else 0.002 + 0.00002 * 16 * k), prefill)
        for _ in range(16):
            accepted = 0
            while accepted < k and rng.random() < 0.7:
                accepted += 1
            depth.observe_acceptance(k, accepted)
    assert depth.choose(16, prefill=False) >= 3
    assert depth.choose(16, prefill=True) == 0


def _simulate(step_seconds, acceptance: float, num_decodes: int, steps: int, seed: int = 0) -> list[int]:
    """Depths an AdaptiveDepth picks, step by step, for a simulated engine whose step times carry 5% noise."""
    return _drive(AdaptiveDepth(k_max=4), [num_decodes] * steps, lambda b, k: step_seconds(k), acceptance,
                  random.Random(seed), noise=0.05)


def _off_best_share(chosen: list[int], best: int) -> float:
    return sum(k != best for k in chosen) / len(chosen)


def test_adaptive_depth_finds_k_max_behind_a_fixed_cost_that_k_1_does_not_repay():
    # 1 ms step, 0.8 ms for speculating at all, 0.05 ms per draft token. With 70% acceptance
    # k = 1 is slower than no speculation (1.7 tokens in 1.85 ms) but k = 4 is 39% faster.
    def seconds(k):
        return 0.001 + (0.0008 + 0.00005 * k) * (k > 0)

    def tokens(k):  # expected tokens per sequence and step at 70% acceptance
        return sum(0.7 ** i for i in range(k + 1))

    assert tokens(1) / seconds(1) < tokens(0) / seconds(0) < tokens(4) / seconds(4)
    assert max(range(5), key=lambda k: tokens(k) / seconds(k)) == 4
    chosen = _simulate(seconds, acceptance=0.7, num_decodes=8, steps=2000)
    assert chosen[-1] == 4 and max(set(chosen[100:]), key=chosen[100:].count) == 4
    assert _off_best_share(chosen[500:], best=4) < 0.03  # exploration once settled
    # Finding it included, the run loses little throughput against always drafting 4.
    rate = sum(tokens(k) for k in chosen) / sum(seconds(k) for k in chosen)
    assert rate > 0.97 * tokens(4) / seconds(4)


def test_adaptive_depth_settles_at_0_when_no_depth_pays_and_finding_out_is_cheap():
    # Under load: a draft token costs about what a real one does, plus a fixed cost to speculate.
    def seconds(k):
        return 0.004 + (0.001 + 0.003 * k) * (k > 0)

    chosen = _simulate(seconds, acceptance=0.7, num_decodes=64, steps=2000)
    assert chosen[-1] == 0 and max(set(chosen[100:]), key=chosen[100:].count) == 0
    assert _off_best_share(chosen[100:], best=0) < 0.03
    # What the search and exploration cost next to always k = 0.
    extra = sum(seconds(k) for k in chosen) / (len(chosen) * seconds(0)) - 1
    assert extra < 0.02, f"{extra:.1%} slower than no speculation"


def test_a_proposal_shorter_than_the_depth_counts_as_rejected_where_it_ends():
    speculator = Speculator(NgramProposer(2, 4), k_max=4, sampler=Sampler())
    request = Request("r", [1, 2, 3, 1, 2], SamplingParams(temperature=0))
    scheduled = ScheduledRequest(request, num_new_tokens=1, num_spec_slots=4, draft_token_ids=[3, 1])
    assert speculator.verify_greedy([3, 1, 9], [scheduled]) == ([2], [9])
    speculator.observe([scheduled], [2])
    attempts, accepts = speculator.depth.attempts, speculator.depth.accepts
    assert accepts[0] > 0.5 and accepts[1] > 0.5  # both drafts accepted
    assert attempts[2] > 1.0 and accepts[2] < 0.5  # the third position was asked for and not filled
    assert attempts[3] == 1.0  # never reached
