"""A new proposer is one class and one registry line; one that asks gets the target's hidden states; a draft
model's proposals stay its own greedy continuation."""

from __future__ import annotations

import random

import pytest

from scheduler import Engine, SamplingParams
from scheduler.speculative import registry
from scheduler.speculative.ngram import NgramProposer
from tests.conftest import hf_greedy, save_tiny_model, tiny_config
from tests.helpers import assert_pool_idle, run_engine


class HiddenStateProbe(NgramProposer):
    """n-gram lookups that also keep what observe() is handed."""

    needs_hidden_states = True
    observed: list = []

    def observe(self, spec, num_accepted, hidden_states):
        rows = [1 + len(s.draft_token_ids) for s in spec]
        # The token each request got after its accepted drafts: its last output token now.
        got = [s.request.output_token_ids[-1] for s in spec]
        self.observed.append((rows, list(num_accepted), got, hidden_states.clone()))


def test_a_registered_proposer_runs_and_gets_the_targets_hidden_states(tiny_model_dir, monkeypatch):
    path, model = tiny_model_dir
    monkeypatch.setitem(registry.PROPOSERS, "probe", f"{__name__}:HiddenStateProbe")
    HiddenStateProbe.observed = []
    engine = Engine(model=str(path), dtype="float32", speculative="probe", adaptive_speculation=False)
    prompts = [[7, 8, 9, 10, 11] * 6, [3, 4, 5] * 9 + [6]]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outputs = run_engine(engine, prompts, params)
    assert [o.token_ids for o in outputs] == [hf_greedy(model, p, 20) for p in prompts]
    assert HiddenStateProbe.observed, "observe was never called"
    target = engine.runner.model
    for rows, num_accepted, got, hidden in HiddenStateProbe.observed:
        assert hidden.shape == (sum(rows), target.config.hidden_size)
        # Row n of a request is the position after its n accepted drafts: its argmax is what it got.
        picks = target.compute_logits(hidden).argmax(dim=-1).tolist()
        starts = [sum(rows[:i]) for i in range(len(rows))]
        assert [picks[start + n] for start, n in zip(starts, num_accepted)] == got
    assert_pool_idle(engine)


def test_an_unknown_method_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="speculative must be one of off, best, ngram, draft, eagle, got 'medusa'"):
        Engine(model="default", speculative="medusa")
    assert "probe" not in registry.PROPOSERS  # the registration above was undone


def test_a_drafts_proposals_stay_its_greedy_continuation_when_steps_without_drafts_come_between(tiny_model_dir,
                                                                                                 tmp_path):
    """After a verification that rejected a draft, a step without drafts computes the position where the draft
    model last wrote the rejected one: its next catch-up must write it again, never count it as held."""
    from transformers import AutoModelForCausalLM

    path, model = tiny_model_dir
    other = tmp_path / "other-draft"
    save_tiny_model(other, tiny_config(num_hidden_layers=1), seed=11)
    rng = random.Random(5)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (9, 30)]
    engine = Engine(model=str(path), dtype="float32", speculative="draft", draft_model=str(other),
                    num_speculative_tokens=3, adaptive_speculation=False, overlap_scheduling=False)
    depths = iter([3, 0] * 200)
    engine.executor.plan = lambda num_decodes, prefill: next(depths) if num_decodes else 0
    proposer, seen = engine.speculator.proposer, []
    propose = proposer.propose

    def spy(spec, pool):
        proposal = propose(spec, pool)
        drafts = proposal.device_drafts.tolist()
        seen.extend((list(s.request.all_token_ids), drafts[r][:len(s.draft_token_ids)]) for r, s in enumerate(spec))
        return proposal

    proposer.propose = spy
    outputs = run_engine(engine, prompts, SamplingParams(temperature=0, max_tokens=24))
    assert [o.token_ids for o in outputs] == [hf_greedy(model, p, 24) for p in prompts]
    draft = AutoModelForCausalLM.from_pretrained(other).eval()
    assert len(seen) > 8
    for history, drafts in seen:
        assert drafts == hf_greedy(draft, history, len(drafts)), len(history)
    assert_pool_idle(engine)
