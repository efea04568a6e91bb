"""Draft distillation: training raises agreement with the target, saved drafts serve it with greedy
output unchanged, a draft made for another target is refused, the command runs end to end."""

from __future__ import annotations

import itertools
import json
import random
import shutil

import pytest
import torch

from scheduler import LLM, Engine, SamplingParams
from scheduler.distill.data import Sample, prompt_stream
from scheduler.distill.evaluate import acceptance
from scheduler.distill.train import TrainConfig, agreement, hf_model, init_draft, train
from scheduler.distill.vocab import answer_token_counts, coverage, frequent_tokens, make_vocab
from scheduler.speculative.draft import compact
from scheduler.speculative.draft.compact import save_compact, save_full, target_fingerprint
from server.cli import main
from tests.conftest import save_tiny_model, tiny_config
from tests.helpers import assert_pool_idle, run_engine

CONFIG = dict(num_hidden_layers=2)
NUM_TRAIN = 128
PROMPT_LENGTHS = (3, 8, 15, 30)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A 2-layer random target, its answers to random prompts (sampled, as training data, and held
    out), and a 1-layer draft before and after a short distillation, saved in both forms."""
    root = tmp_path_factory.mktemp("distill")
    save_tiny_model(root / "target", tiny_config(**CONFIG), seed=3)
    llm = LLM(str(root / "target"), dtype="float32")
    rng = random.Random(0)
    prompts = [[rng.randrange(512) for _ in range(PROMPT_LENGTHS[i % 4])] for i in range(NUM_TRAIN + 16)]
    params = [SamplingParams(temperature=(0.0, 0.7, 1.0)[i % 3], seed=i, max_tokens=32, ignore_eos=True)
              for i in range(len(prompts))]
    samples = [Sample(p + out.token_ids, len(p)) for p, out in zip(prompts, llm.generate(prompts, params))]
    teacher = hf_model(llm.engine.model, torch.device("cpu"), torch.float32)
    draft = init_draft(teacher, num_layers=1)
    held_out = samples[NUM_TRAIN:]
    before = agreement(teacher, draft, held_out)
    config = TrainConfig(lr=5e-3, batch_tokens=512, epochs=4)
    stats = train(teacher, draft, samples[:NUM_TRAIN], config, show_progress=False)
    after = agreement(teacher, draft, held_out)
    manifest = {"target": "tiny", "target_fingerprint": target_fingerprint(llm.engine.model)}
    save_compact(draft, root / "compact", manifest)
    save_full(draft, None, root / "full", manifest)
    return root, prompts[NUM_TRAIN:], before, after, stats, samples[:NUM_TRAIN]


def test_distillation_raises_agreement_with_the_target(distilled):
    _, _, before, after, stats, _ = distilled
    assert stats["steps"] > 0
    assert after > before + 0.05, f"agreement {before:.3f} -> {after:.3f}"


@pytest.mark.parametrize("form", ["compact", "full"])
def test_saved_draft_leaves_greedy_output_unchanged(distilled, form):
    root, prompts, *_ = distilled
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = [o.token_ids for o in run_engine(Engine(model=str(root / "target"), dtype="float32"), prompts, params)]
    engine = Engine(model=str(root / "target"), dtype="float32", speculative="draft", draft_model=str(root / form),
                    num_speculative_tokens=3, adaptive_speculation=False)
    outputs = run_engine(engine, prompts, params)
    assert [o.token_ids for o in outputs] == expected
    assert sum(o.metrics.accepted_tokens for o in outputs) > 0
    assert_pool_idle(engine)


def test_draft_restricted_to_frequent_tokens_drafts_only_those_and_leaves_greedy_output_unchanged(distilled, tmp_path):
    root, prompts, *_, samples = distilled
    token_ids, summary = make_vocab(samples, 512, 96, tokenizer=None)
    assert len(token_ids) == summary["size"] == 96 and 0 < summary["held_out_coverage"] < 1
    shutil.copytree(root / "compact", tmp_path / "draft")
    compact.save_vocab(tmp_path / "draft", token_ids)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = [o.token_ids for o in run_engine(Engine(model=str(root / "target"), dtype="float32"), prompts, params)]
    engine = Engine(model=str(root / "target"), dtype="float32", speculative="draft",
                    draft_model=str(tmp_path / "draft"), num_speculative_tokens=3, adaptive_speculation=False)
    assert engine.speculator.proposer.runner.model.vocab_ids.tolist() == token_ids
    drafted = []
    verify_greedy = engine.speculator.verify_greedy
    def spy(target_ids, sampled):
        drafted.extend(t for s in sampled for t in s.draft_token_ids)
        return verify_greedy(target_ids, sampled)
    engine.speculator.verify_greedy = spy
    outputs = run_engine(engine, prompts, params)
    assert [o.token_ids for o in outputs] == expected
    assert drafted and set(drafted) <= set(token_ids)
    assert sum(o.metrics.accepted_tokens for o in outputs) > 0
    assert_pool_idle(engine)


def test_frequent_tokens_keep_the_most_counted_and_the_special_ones():
    counts = answer_token_counts([Sample([9, 9, 1, 1, 1, 4, 4, 2, 2], 1), Sample([5, 4], 1)], vocab_size=10)
    assert counts.tolist() == [0, 3, 2, 0, 3, 0, 0, 0, 0, 1]
    assert frequent_tokens(counts, 2) == [1, 4]
    assert frequent_tokens(counts, 3) == [1, 2, 4]  # the tie between 2 and 9 goes to the lower id
    assert frequent_tokens(counts, 2, always=[7]) == [1, 4, 7]
    assert frequent_tokens(counts, 10) is None
    assert coverage(counts, [1, 4]) == 6 / 9 and coverage(counts, None) == 1.0


def test_a_bad_draft_vocabulary_is_refused_naming_the_file(distilled, tmp_path):
    root, *_ = distilled
    shutil.copytree(root / "compact", tmp_path / "draft")
    compact.save_vocab(tmp_path / "draft", [3, 700])
    refusal = r"draft_model: .*draft_vocab.safetensors: needs distinct token ids in \[0, 512\)"
    with pytest.raises(ValueError, match=refusal):
        Engine(model=str(root / "target"), speculative="draft", draft_model=str(tmp_path / "draft"))


def test_compact_draft_fits_its_target_in_any_dtype(distilled):
    root, prompts, *_ = distilled
    engine = Engine(model=str(root / "target"), dtype="bfloat16", speculative="draft",
                    draft_model=str(root / "compact"), adaptive_speculation=False)
    outputs = run_engine(engine, prompts[:2], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert all(len(o.token_ids) == 8 for o in outputs)


def test_compact_draft_for_another_target_is_refused(distilled, tmp_path):
    root, *_ = distilled
    save_tiny_model(tmp_path / "other", tiny_config(**CONFIG), seed=4)  # same shapes, other weights
    with pytest.raises(ValueError, match="draft_model: made for another target: .* distilled from 'tiny'"):
        Engine(model=str(tmp_path / "other"), speculative="draft", draft_model=str(root / "compact"))


def test_shipped_draft_is_used_when_it_was_made_for_the_target(distilled, tmp_path, monkeypatch):
    root, prompts, *_ = distilled
    monkeypatch.setattr(compact, "SHIPPED_DRAFTS", tmp_path / "drafts")
    with pytest.raises(ValueError, match="needs draft_model .*no draft shipped with beastserve"):
        Engine(model=str(root / "target"), speculative="draft")
    shutil.copytree(root / "compact", tmp_path / "drafts" / "tiny")
    engine = Engine(model=str(root / "target"), dtype="float32", speculative="draft", adaptive_speculation=False)
    outputs = run_engine(engine, prompts[:4], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert sum(o.metrics.accepted_tokens for o in outputs) > 0
    save_tiny_model(tmp_path / "other", tiny_config(**CONFIG), seed=4)
    with pytest.raises(ValueError, match="no draft shipped"):
        Engine(model=str(tmp_path / "other"), speculative="draft")


def test_distill_command_writes_a_draft_and_its_evaluation(tiny_text_model_dir, tmp_path, capsys):
    path, _ = tiny_text_model_dir
    out = tmp_path / "draft"
    argv = ["distill-draft", "--target", str(path), "--out", str(out), "--layers", "1", "--tokens", "120",
            "--max-answer-tokens", "8", "--max-prompt-tokens", "8", "--max-num-seqs", "4", "--eval-prompts", "2",
            "--eval-tokens", "6", "--eval-speed-prompts", "1", "--batch-tokens", "1024", "--epochs", "1",
            "--device", "cpu", "--data-dtype", "bfloat16", "--draft-vocab", "50"]
    assert main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    assert set(report["acceptance"]) == {"greedy", "temperature_0.7"}
    assert report["speed"]["concurrency"] == 1 and report["speed"]["outputs_identical"]
    assert report["data"]["answer_tokens"] >= 120 and report["train"]["steps"] > 0
    manifest = json.loads((out / "draft.json").read_text())
    assert manifest["command"] == "beastserve " + " ".join(argv)
    vocab_size = manifest["vocab"]["of"]
    assert vocab_size > 50 and 0 < manifest["vocab"]["held_out_coverage"] <= 1
    assert len(compact.load_vocab(out, vocab_size)) == manifest["vocab"]["size"] >= 50
    assert "held-out evaluation" in capsys.readouterr().out


def test_distill_command_names_the_bad_flag(tiny_model_dir, tmp_path, capsys):
    path, _ = tiny_model_dir
    base = ["distill-draft", "--target", str(path), "--out", str(tmp_path / "d")]
    assert main(base + ["--layers", "0"]) == 2
    assert "--layers must be >= 1, got 0" in capsys.readouterr().err
    assert main(base + ["--prompts", str(tmp_path / "missing.jsonl")]) == 2
    assert "--prompts: no such file" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "hi"}\n{"text": 3}\n')
    assert main(base + ["--prompts", str(tmp_path / "bad.jsonl")]) == 2
    assert "--prompts: line 2 needs a non-empty 'prompt' string or 'messages' list" in capsys.readouterr().err
    assert main(base + ["--layers", "3"]) == 2
    assert "--layers must be at most the target's 2 layers, got 3" in capsys.readouterr().err


def test_acceptance_is_counted_per_position_among_drafts_that_got_there(distilled):
    root, prompts, *_ = distilled
    target = str(root / "target")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    itself = Engine(model=target, dtype="float32", speculative="draft", draft_model=target, num_speculative_tokens=3,
                    adaptive_speculation=False)
    assert acceptance(itself, prompts, params)["per_position"] == [1.0, 1.0, 1.0]
    engine = Engine(model=target, dtype="float32", speculative="draft", draft_model=str(root / "compact"),
                    num_speculative_tokens=3, adaptive_speculation=False)
    for p in prompts:
        engine.add_request(None, params, prompt_token_ids=p)
    while engine.has_unfinished():
        engine.step()
        stats = engine.last_step_stats
        accepted, verified = stats.accepted_per_position, stats.verified_per_position
        assert (verified[0] if verified else 0) == stats.num_drafts  # every draft's first token is verified
        for i in range(len(verified)):
            assert accepted[i] <= verified[i]
            assert i + 1 == len(verified) or verified[i + 1] <= accepted[i]  # position i + 1 needs i accepted
    result = acceptance(engine, prompts, params)
    assert 0 < result["per_position"][0] < 1
    assert all(0 <= a <= 1 for a in result["per_position"] if a is not None)


SHIPPED_DEFAULT = compact.SHIPPED_DRAFTS / "smollm2-135m-instruct"


@pytest.mark.skipif(not SHIPPED_DEFAULT.is_dir(), reason="no draft shipped for the default model yet")
def test_the_draft_shipped_for_the_default_model_serves_it():
    assert (SHIPPED_DEFAULT / compact.LAYERS_FILE).stat().st_size <= 16_000_000
    assert compact.read_manifest(SHIPPED_DEFAULT)["command"]
    chats = [[{"role": "user", "content": q}] for q in ("How do plants make food?", "Give me two tips for running.")]
    params = SamplingParams(temperature=0, max_tokens=48)
    plain = LLM("default", dtype="float32").chat(chats, params)
    # One token drafted a step: every draft is then the first position, accepted ~60% of the time held out.
    drafted = LLM("default", dtype="float32", speculative="draft", adaptive_speculation=False,
                  num_speculative_tokens=1).chat(chats, params)
    assert [o.token_ids for o in drafted] == [o.token_ids for o in plain]
    accepted = sum(o.metrics.accepted_tokens for o in drafted)
    assert accepted / sum(o.metrics.draft_tokens for o in drafted) > 0.45


def test_user_prompts_are_answered_at_every_temperature_and_greedily_once():
    prompts = [[{"role": "user", "content": str(i)}] for i in range(4)]
    pairs = list(itertools.islice(prompt_stream(None, prompts, [], (0.0, 0.7, 1.0), 8, 8), 40))
    seen = {(c[0]["content"], t) for c, t in pairs}
    assert seen == {(str(i), t) for i in range(4) for t in (0.0, 0.7, 1.0)}
    assert sorted(c[0]["content"] for c, t in pairs if t == 0) == ["0", "1", "2", "3"]
    assert list(prompt_stream(None, prompts, [], (0.0,), 8, 8)) == [(c, 0.0) for c in prompts]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_merged_projections_split_back_to_transformers_names(arch):
    from scheduler.worker.models.llama import CausalLM

    model = CausalLM(tiny_config(arch), 64)
    with torch.no_grad():  # the embedding starts uninitialised (the loader always fills it): give every weight values
        for param in model.parameters():
            param.normal_()
    expected = {name: t.clone() for name, t in model.state_dict().items()}
    for layer in model.model.layers:  # what the CUDA path does before running
        layer.self_attn.fuse_projections()
        layer.mlp.fuse_projections()
    got = model.hf_state_dict()
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
