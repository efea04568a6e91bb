"""Tensor parallelism over NCCL on two GPUs of one host: greedy tokens equal one GPU's, eager and with CUDA
graphs (which capture the collectives); skipped where fewer than two GPUs exist."""

from __future__ import annotations

import pytest
import torch

from scheduler import Engine, SamplingParams
from tests.helpers import assert_pool_idle, run_engine
from tests.test_parity import hf_references, random_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


@pytest.mark.parametrize("eager", [True, False])
def test_tp2_on_two_gpus_float32_greedy_matches_hf(tiny_model_dir, eager):
    path, model = tiny_model_dir
    prompts = random_prompts(model.config.vocab_size)
    engine = Engine(model=str(path), device="cuda", dtype="float32", tensor_parallel_size=2, enforce_eager=eager,
                    max_num_batched_tokens=32, max_num_seqs=8, kv_cache_bytes=16 * 4096)
    try:
        outputs = run_engine(engine, prompts, SamplingParams(temperature=0, max_tokens=24), arrive_every=1)
        assert [o.token_ids for o in outputs] == hf_references(model, prompts)
        assert_pool_idle(engine)
    finally:
        engine.shutdown()


def test_default_model_tp2_on_two_gpus_float32_equals_tp1(default_tokenizer):
    prompts = [default_tokenizer(t)["input_ids"] for t in ("The capital of France is", "def add(a, b):")]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    tokens = {}
    for size in (1, 2):
        engine = Engine(model="default", device="cuda", dtype="float32", tensor_parallel_size=size,
                        gpu_memory_utilization=0.5)
        try:
            tokens[size] = [o.token_ids for o in run_engine(engine, prompts, params)]
        finally:
            engine.shutdown()
    assert tokens[2] == tokens[1]
