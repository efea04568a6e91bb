"""Unset step limits are chosen from the device at start-up; an explicit value always wins."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from scheduler import Engine, EngineConfig
from scheduler.device_defaults import GiB, model_weight_bytes, resolve_engine_config, resolved_defaults

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("device, memory_gib, weight_gib, serving, expected", [
    (CPU, 0, 1, False, (2048, 256)),
    (CPU, 0, 1, True, (2048, 256)),
    (CUDA, 80, 2.5, False, (16384, 1024)),  # H100, a 1B model
    (CUDA, 141, 16, False, (16384, 1024)),  # H200, an 8B model
    (CUDA, 80, 2.5, True, (8192, 1024)),  # the daemon: smaller steps, shorter stalls for streams
    (CUDA, 70, 35, False, (16384, 1024)),  # exactly 70 GiB, weights exactly half
    (CUDA, 69.5, 2.5, False, (8192, 256)),
    (CUDA, 24, 6, False, (8192, 256)),
    (CUDA, 24, 6, True, (2048, 256)),
    (CUDA, 80, 64, False, (2048, 256)),  # a 32B model on an H100: little room for KV cache
    (CUDA, 24, 16, True, (2048, 256)),
])
def test_each_row_of_the_table(device, memory_gib, weight_gib, serving, expected):
    assert resolved_defaults(device, int(memory_gib * GiB), int(weight_gib * GiB), serving) == expected


def test_a_cuda_index_counts_as_cuda():
    assert resolved_defaults(torch.device("cuda", 1), 80 * GiB, GiB) == (16384, 1024)


def test_tied_weights_count_once():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    assert model_weight_bytes(model) == 10 * 4 * 4


def _fake_gpu(monkeypatch, name: str, memory_gib: int):
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(name=name, total_memory=memory_gib * GiB))


def test_a_big_gpu_gets_the_large_limits_and_logs_them(monkeypatch, caplog):
    _fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3", 80)
    with caplog.at_level(logging.INFO, logger="scheduler.device_defaults"):
        config = resolve_engine_config(EngineConfig(), CUDA, torch.nn.Linear(64, 64))
    assert (config.max_num_batched_tokens, config.max_num_seqs) == (16384, 1024)
    assert caplog.messages == ["engine defaults for NVIDIA H100 80GB HBM3 (80 GiB): max_num_batched_tokens=16384, "
                               "max_num_seqs=1024 (set --max-num-seqs/--max-num-batched-tokens to override)"]
    served = resolve_engine_config(EngineConfig(), CUDA, torch.nn.Linear(64, 64), serving=True)
    assert (served.max_num_batched_tokens, served.max_num_seqs) == (8192, 1024)


def test_explicit_values_win_and_only_the_unset_one_is_chosen(monkeypatch, caplog):
    _fake_gpu(monkeypatch, "NVIDIA H200", 141)
    model = torch.nn.Linear(64, 64)
    with caplog.at_level(logging.INFO, logger="scheduler.device_defaults"):
        config = resolve_engine_config(EngineConfig(max_num_seqs=64), CUDA, model)
    assert (config.max_num_batched_tokens, config.max_num_seqs) == (16384, 64)
    assert "max_num_batched_tokens=16384 (" in caplog.text and "max_num_seqs=" not in caplog.text
    caplog.clear()
    explicit = EngineConfig(max_num_seqs=8, max_num_batched_tokens=32)
    assert resolve_engine_config(explicit, CUDA, model) is explicit and not caplog.messages


def test_explicit_values_are_still_validated_at_construction():
    with pytest.raises(ValueError, match=r"^max_num_seqs must be an integer >= 1, got 0$"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match=r"^max_num_batched_tokens must be an integer >= 1, got -1$"):
        EngineConfig(max_num_batched_tokens=-1)


def test_a_cpu_engine_built_with_defaults_has_the_cpu_limits_and_says_so(tiny_model_dir, caplog):
    path, _ = tiny_model_dir
    with caplog.at_level(logging.INFO, logger="scheduler.device_defaults"):
        engine = Engine(model=str(path), device="cpu", dtype="float32")
    assert (engine.config.max_num_batched_tokens, engine.config.max_num_seqs) == (2048, 256)
    assert (engine.scheduler.max_num_batched_tokens, engine.scheduler.max_num_seqs) == (2048, 256)
    said = [r.getMessage() for r in caplog.records if r.name == "scheduler.device_defaults"]
    assert said == ["engine defaults for cpu: max_num_batched_tokens=2048, max_num_seqs=256 "
                    "(set --max-num-seqs/--max-num-batched-tokens to override)"]


def test_a_cpu_engine_keeps_explicit_limits(tiny_model_dir):
    path, _ = tiny_model_dir
    engine = Engine(model=str(path), device="cpu", dtype="float32", max_num_seqs=3, max_num_batched_tokens=40)
    assert (engine.scheduler.max_num_batched_tokens, engine.scheduler.max_num_seqs) == (40, 3)
    assert (engine.config.max_num_batched_tokens, engine.config.max_num_seqs) == (40, 3)
