"""EAGLE head distillation: prompts and texts come from local files with a held-out split by file that
training never reads, `distill-draft --kind eagle` trains a head end to end and resumes from its
checkpoint, training-time-test training teaches the head its target, the head shipped for the
default model is found by its fingerprint."""

from __future__ import annotations

import json
import random

import pytest
import torch

from scheduler.distill.data import Sample
from scheduler.distill.eagle_evaluate import simulated_acceptance
from scheduler.distill.eagle_train import CHECKPOINT, HeadTrainConfig, strip_checkpoint, train_head
from scheduler.distill.features import LiveBatches, collate, column_map, teacher_features
from scheduler.distill.sources import is_held_out, load_local_data, local_data
from scheduler.distill.train import hf_model
from scheduler.speculative.eagle import files
from scheduler.speculative.eagle.head import EagleHead
from scheduler.worker.models import load_model
from server.cli import main
from tests.conftest import save_tiny_model, tiny_config

FUNCTION = '''

def {name}(values: list[int], limit: int = 3) -> list[int]:
    """Return the first {name} values that are below the limit, in the order given.

    Values equal to the limit are left out.
    """
    return [v for v in values if v < limit]
'''
PROSE = ("The {name} module keeps a record of every change a user makes to a document, so that any earlier "
         "version can be restored later. Each record holds the time of the change and what it replaced, and the "
         "history can be searched by date or by author.\n\n")


def write_sources(root, count: int = 24):
    """count packages of one .py and one .md file each, and a benchmark folder that must never be read;
    returns the names of the held-out packages (at least one, by choosing enough names)."""
    names, n = [], 0
    while len(names) < count or not any(is_held_out(f"{x}/mod.py") for x in names):
        names.append(f"pkg{n}")
        n += 1
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "mod.py").write_text(f'"""The {name} package."""' + FUNCTION.format(name=f"take_{name}"))
        (root / name / "guide.md").write_text(PROSE.format(name=name) * 2)
    (root / "lm_eval" / "tasks").mkdir(parents=True)
    (root / "lm_eval" / "tasks" / "bench.py").write_text(FUNCTION.format(name="benchmark_task"))
    return {x for x in names if is_held_out(f"{x}/mod.py")}, {x for x in names if is_held_out(f"{x}/guide.md")}


def test_prompts_and_texts_come_from_local_files_with_held_out_files_never_trained_on(tmp_path):
    held_code, held_prose = write_sources(tmp_path)
    data = local_data([tmp_path], seed=0)
    trained = data.code_prompts + data.prose_prompts + data.texts
    held = data.held_out_code_prompts + data.held_out_prose_prompts
    assert data.code_prompts and data.prose_prompts and data.texts and data.held_out_code_prompts
    assert any("take_pkg" in p and ("def " in p or "Write" in p) for p in data.code_prompts)
    assert any("restored later" in p for p in data.prose_prompts)
    for name in held_code:
        assert not any(f"take_{name}(" in t or f"take_{name}`" in t for t in trained)
        assert any(f"take_{name}" in p for p in data.held_out_code_prompts)
    for name in held_prose:
        assert not any(f"The {name} module" in t for t in data.prose_prompts + data.texts)
    assert all(any(f"take_{x}" in p or f"The {x} " in p for x in held_code | held_prose) for p in held)
    assert not any("benchmark_task" in t for t in trained + held)


def test_distill_eagle_trains_a_head_end_to_end_and_resumes_from_its_checkpoint(tiny_text_model_dir, tmp_path,
                                                                                 capsys):
    path, _ = tiny_text_model_dir
    write_sources(tmp_path / "src", count=8)
    out = tmp_path / "head"
    argv = ["distill-draft", "--kind", "eagle", "--target", str(path), "--out", str(out), "--sources",
            str(tmp_path / "src"), "--tokens", "96", "--max-answer-tokens", "8", "--max-prompt-tokens", "8",
            "--max-num-seqs", "8", "--eval-prompts", "2", "--eval-tokens", "8", "--text-tokens", "256",
            "--text-chunk", "64", "--batch-tokens", "512", "--draft-vocab", "300", "--device", "cpu"]
    assert main(argv + ["--epochs", "1"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert set(report["simulated"]) == {"code", "chat"} and report["k"] == 4
    assert all(r["chains"] > 0 and 0 <= r["per_drafted_token"] <= 1 for r in report["simulated"].values())
    assert set(report["data"]["by_kind"]) == {"code", "chat", "prose", "text"}
    first_steps = report["train"]["steps"]
    assert first_steps > 0
    manifest = files.read_manifest(out)
    assert manifest["command"] == "beastserve " + " ".join(argv + ["--epochs", "1"])
    assert "held-out code" in capsys.readouterr().out
    target = load_model(str(path), None, "auto", torch.float32, torch.device("cpu"), None)
    head = files.load_head(out, target, torch.float32, torch.device("cpu"))
    assert head.vocab_ids is not None and len(head.vocab_ids) >= 300

    assert main(argv + ["--layers", "3"]) == 2
    assert "--layers: not used by --kind eagle" in capsys.readouterr().err
    data_file = out / "data" / "train.npz"
    written = data_file.stat().st_mtime_ns
    assert main(argv + ["--epochs", "2", "--resume"]) == 0
    resumed = json.loads((out / "eval.json").read_text())
    assert resumed["train"]["steps"] == 2 * first_steps  # carried on from the checkpoint, not from scratch
    assert data_file.stat().st_mtime_ns == written  # and from the data already made

    other = ["--out" if a == "--out" else str(tmp_path / "other") if a == str(out) else a for a in argv]
    assert main(other + ["--epochs", "1", "--extra-data", str(out), "--tokens", "16"]) == 0
    joined = json.loads((tmp_path / "other" / "eval.json").read_text())
    assert joined["data"]["extra"]["tokens"] == resumed["data"]["read_tokens"]  # the first run's reads, reused


def test_training_time_test_teaches_the_head_its_targets_chains(tmp_path):
    """A random target's greedy answers: after training, the head's simulated chains on held-out
    answers are accepted more often than the untrained head's."""
    save_tiny_model(tmp_path / "target", tiny_config(num_hidden_layers=2), seed=5)
    target = load_model(str(tmp_path / "target"), None, "auto", torch.float32, torch.device("cpu"), None)
    teacher = hf_model(target.model, torch.device("cpu"), torch.float32)
    rng = random.Random(0)
    prompts = torch.tensor([[rng.randrange(512) for _ in range(4)] for _ in range(72)])
    with torch.no_grad():
        answers = teacher.generate(prompts, max_new_tokens=24, do_sample=False, pad_token_id=0)
    samples = [Sample(row.tolist(), 4, "code") for row in answers]
    torch.manual_seed(0)
    head = EagleHead.for_target(teacher.config, None, 512).bind(teacher.model.embed_tokens.weight,
                                                                teacher.lm_head.weight)
    features = teacher_features(teacher, samples, head.layer_ids, top_k=8)
    before = simulated_acceptance(head, features[64:], depth=3)
    stats = train_head(head, features[:64], HeadTrainConfig(unroll=3, lr=3e-3, batch_tokens=1024, epochs=8),
                       tmp_path, show_progress=False)
    after = simulated_acceptance(head, features[64:], depth=3)
    assert stats["steps"] > 0 and after["chains"] == before["chains"] > 0
    assert after["per_drafted_token"] > before["per_drafted_token"] + 0.05, (before, after)
    assert after["per_position"][1] > 0  # the unrolled steps learnt too


def test_local_files_are_read_within_their_count_and_time_bounds(tmp_path):
    write_sources(tmp_path, count=8)
    assert local_data([tmp_path], seed=0, max_files=3).files == 6  # 3 code and 3 prose files
    assert local_data([tmp_path], seed=0, max_seconds=1e-9).files == 0  # the time cap passed at once


def test_a_prompts_file_carries_the_data_and_its_split_and_a_run_resumes_live_from_a_stripped_checkpoint(
        tiny_text_model_dir, tmp_path, capsys):
    """--stage data writes the prompts file (no model run); a run from it reads no local file, trains
    with the target read live inside the loop, and a second call carries on from a checkpoint carried
    without its optimiser moments."""
    path, _ = tiny_text_model_dir
    write_sources(tmp_path / "src", count=8)
    sources = tmp_path / "sources"
    assert main(["distill-draft", "--kind", "eagle", "--stage", "data", "--out", str(sources), "--sources",
                 str(tmp_path / "src"), "--tokens", "96", "--text-tokens", "256"]) == 0
    carried = load_local_data(sources / "sources.json.gz")
    scanned = local_data([tmp_path / "src"], seed=0)
    assert carried.held_out_code_prompts == scanned.held_out_code_prompts and carried.held_out_files > 0
    assert carried.code_prompts == scanned.code_prompts and carried.texts
    out = tmp_path / "head"
    argv = ["distill-draft", "--kind", "eagle", "--target", str(path), "--out", str(out), "--prompts-from",
            str(sources / "sources.json.gz"), "--tokens", "96", "--max-answer-tokens", "8", "--max-prompt-tokens",
            "8", "--max-num-seqs", "8", "--eval-prompts", "2", "--eval-tokens", "8", "--text-tokens", "256",
            "--text-chunk", "64", "--batch-tokens", "512", "--draft-vocab", "300", "--device", "cpu", "--features",
            "live", "--phases", "answers=0.3,train=0.6,eval=0.1"]
    assert main(argv + ["--epochs", "1"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["features"] == "live" and report["data"]["sources"]["from"].endswith("sources.json.gz")
    assert set(report["phase_seconds"]) == {"answers", "train", "eval"} and report["data"]["read_tokens"] == 0
    assert all(r["chains"] > 0 for r in report["simulated"].values())
    before = (out / CHECKPOINT).stat().st_size
    assert strip_checkpoint(out / CHECKPOINT) < before
    assert main(argv + ["--epochs", "2", "--resume"]) == 0
    assert json.loads((out / "eval.json").read_text())["train"]["steps"] == 2 * report["train"]["steps"]
    assert main(argv + ["--prompts-from", str(tmp_path / "nothing.gz")]) == 2
    assert "--prompts-from: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv + ["--phases", "answers=1,talk=1"])
    assert "unknown phase 'talk'" in capsys.readouterr().err


def test_the_target_read_live_gives_the_batches_cached_features_give(tmp_path):
    save_tiny_model(tmp_path / "target", tiny_config(num_hidden_layers=2), seed=3)
    target = load_model(str(tmp_path / "target"), None, "auto", torch.float32, torch.device("cpu"), None)
    teacher = hf_model(target.model, torch.device("cpu"), torch.float32)
    rng = random.Random(1)
    samples = [Sample([rng.randrange(512) for _ in range(n)], p, "chat") for n, p in ((12, 4), (9, 1), (16, 16))]
    layer_ids, columns = [0, 1, 1], column_map(torch.arange(0, 512, 2), 512)  # half the vocabulary
    for learn_prompts in (False, True):
        cached = collate(teacher_features(teacher, samples, layer_ids, 6, learn_prompts=learn_prompts), columns,
                         torch.device("cpu"))
        live = LiveBatches(teacher, samples, layer_ids, 6, columns, learn_prompts=learn_prompts).batch(
            [0, 1, 2], torch.device("cpu"))
        assert set(live) == set(cached)
        for name in ("input_ids", "greedy", "valid", "known"):
            assert torch.equal(live[name], cached[name]), name
        assert torch.equal(live["cols"][live["valid"]], cached["cols"][cached["valid"]])
        real = torch.arange(16)[None, :] < torch.tensor([12, 9, 16])[:, None]  # padding reads differ, unread
        torch.testing.assert_close(live["aux"][real].float(), cached["aux"][real].float())
        torch.testing.assert_close(live["probs"], cached["probs"], atol=2e-3, rtol=0)  # float16 in the cache
        # learnt from the last prompt token on, or (learn_prompts) from the first
        assert live["known"][0, 3] and live["known"][0, :3].all() == learn_prompts
        assert live["known"][2].sum() == (16 if learn_prompts else 1)
