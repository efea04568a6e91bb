"""The same engine on CUDA: the reference attention path must stay exact there too."""

from __future__ import annotations

import pytest

from scheduler import Engine, SamplingParams
from tests.helpers import assert_pool_idle, run_engine
from tests.test_parity import hf_references, random_prompts

pytestmark = pytest.mark.gpu


def test_cuda_float32_greedy_matches_hf(tiny_model_dir):
    path, model = tiny_model_dir
    prompts = random_prompts(model.config.vocab_size)
    engine = Engine(model=str(path), device="cuda", dtype="float32", max_num_batched_tokens=32,
                    kv_cache_bytes=16 * 8192)
    outputs = run_engine(engine, prompts, SamplingParams(temperature=0, max_tokens=24), arrive_every=1)
    assert [o.token_ids for o in outputs] == hf_references(model, prompts)
    assert_pool_idle(engine)


def test_cuda_bfloat16_default_shape_runs(tmp_path):
    from tests.conftest import tiny_config

    config = tiny_config(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048)
    engine = Engine(model=config, load_format="dummy", device="cuda")
    assert engine.dtype.is_floating_point and str(engine.dtype) == "torch.bfloat16"
    outputs = run_engine(engine, [[1] * n for n in (5, 100, 700)],
                         SamplingParams(temperature=0.7, seed=1, max_tokens=16, ignore_eos=True))
    assert [len(o.token_ids) for o in outputs] == [16, 16, 16]
    assert_pool_idle(engine)


def test_the_kv_cache_is_sized_from_measured_steps_and_the_largest_steps_fit(tmp_path):
    """The room kept for a step's forward is what the largest step took when run (less than the fp32 estimate from
    the shape), and with the rest of the card in KV blocks, a full prompt step and a full decode batch still run."""
    import torch

    from scheduler.worker.memory import estimated_step_peak, measure_step_peak
    from tests.conftest import tiny_config

    config = tiny_config(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048)
    engine = Engine(model=config, load_format="dummy", device="cuda", max_num_seqs=256, max_num_batched_tokens=4096)
    measured = measure_step_peak(engine.model, engine.config, engine.dtype, engine.device, 2048)
    estimated = estimated_step_peak(engine.config, config)
    assert 0 < measured.forward < estimated.forward
    free, total = torch.cuda.mem_get_info(engine.device)
    assert free < 0.2 * total  # the KV cache took the card's share
    prompts = [[1] * 2000, [2] * 2000] + [[3 + i] * 8 for i in range(254)]
    outputs = run_engine(engine, prompts, SamplingParams(temperature=0.7, top_p=0.9, seed=1, max_tokens=8,
                                                         ignore_eos=True))
    assert all(len(o.token_ids) == 8 for o in outputs)
    assert_pool_idle(engine)


@pytest.mark.parametrize("mode", ["ngram", "draft", "eagle"])
def test_cuda_speculative_greedy_matches_hf(tiny_model_dir, mode, tmp_path):
    """CUDA graphs of the target (with the layers an EAGLE head reads kept) and of the drafts."""
    path, model = tiny_model_dir
    prompts = random_prompts(model.config.vocab_size) + [[3, 4, 5, 6] * 10]
    extra = dict(draft_model=str(path)) if mode == "draft" else {}
    if mode == "eagle":
        from tests.test_eagle import save_head, train_head

        save_head(train_head(model, steps=40), model, tmp_path)
        extra = dict(eagle_head=str(tmp_path), num_speculative_tokens=3)
    engine = Engine(model=str(path), device="cuda", dtype="float32", speculative=mode, adaptive_speculation=False,
                    max_num_batched_tokens=32, kv_cache_bytes=16 * 2 * 8192, **extra)
    params = SamplingParams(temperature=0, max_tokens=24)
    outputs = run_engine(engine, prompts, params, arrive_every=1)
    assert [o.token_ids for o in outputs] == hf_references(model, prompts)
    assert sum(o.metrics.accepted_tokens for o in outputs) > 0
    sampled = run_engine(engine, prompts, SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=16,
                                                         ignore_eos=True))
    assert all(len(o.token_ids) == 16 for o in sampled)
    assert_pool_idle(engine)


def test_cuda_prompt_logprobs_and_logit_bias_match_the_cpu_rules(tiny_model_dir):
    """Fused kernels and CUDA graphs: prompt logprobs of chunked prompts equal HF's, and logit_bias holds
    under n-gram speculation."""
    from tests.test_logit_bias import hf_biased_greedy
    from tests.test_prompt_options import assert_prompt_logprobs

    path, model = tiny_model_dir
    prompts = random_prompts(model.config.vocab_size, lengths=(1, 9, 40, 100)) + [[3, 4, 5, 6] * 10]
    engine = Engine(model=str(path), device="cuda", dtype="float32", speculative="ngram", adaptive_speculation=False,
                    max_num_batched_tokens=32, kv_cache_bytes=16 * 2 * 8192)
    asking = run_engine(engine, prompts, SamplingParams(temperature=0, max_tokens=16, prompt_logprobs=3),
                        arrive_every=1)
    for prompt, out in zip(prompts, asking):
        assert_prompt_logprobs(model, prompt, out.prompt_logprobs, tolerance=1e-3)
    bias = {asking[2].token_ids[0]: -100.0, 7: 3.0}
    biased = run_engine(engine, prompts, SamplingParams(temperature=0, max_tokens=24, logit_bias=bias))
    assert [o.token_ids for o in biased] == [hf_biased_greedy(model, p, bias) for p in prompts]
    assert sum(o.metrics.accepted_tokens for o in biased) > 0
    assert_pool_idle(engine)
