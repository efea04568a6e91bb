"""The CUDA fast path: Triton kernels against the pure-torch reference, CUDA graphs against eager."""

from __future__ import annotations

import random

import pytest
import torch

from scheduler import Engine, SamplingParams
from scheduler.worker.attention import AttentionMetadata
from scheduler.worker.attention import reference as ref_attention
from tests.conftest import tiny_config
from tests.helpers import assert_pool_idle, run_engine
from tests.test_parity import hf_references, random_prompts

pytestmark = pytest.mark.gpu


def random_mixed_batch(seed: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype, block_size: int = 16):
    """Decodes first, then verification-sized queries and prefill chunks, over scattered blocks."""
    rng = random.Random(seed)
    query_lens = sorted([1] * rng.randint(0, 6) + [rng.randint(2, 6) for _ in range(rng.randint(0, 3))]
                        + [rng.randint(7, 300) for _ in range(rng.randint(0, 3))]) or [1]
    contexts = [rng.choice([0, rng.randint(1, 40), rng.randint(41, 900)]) for _ in query_lens]
    seq_lens = [c + q for c, q in zip(contexts, query_lens)]
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 8
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-s // block_size))] for s in seq_lens]
    width = max(map(len, tables))
    gen = torch.Generator(device="cuda").manual_seed(seed)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=gen, device="cuda").to(dtype)
    v_cache = torch.randn(cache_shape, generator=gen, device="cuda").to(dtype)
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen, device="cuda").to(dtype)
    num_decodes = sum(1 for n in query_lens if n == 1)
    longer = query_lens[num_decodes:]
    cuda = dict(device="cuda")
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(sum(query_lens), dtype=torch.long, **cuda),
        query_start_loc=torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), **cuda),
        seq_lens=torch.tensor(seq_lens, **cuda),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], **cuda),
        num_decodes=num_decodes, max_query_len=max(longer) if longer else 1, max_seq_len=max(seq_lens))
    return q, k_cache, v_cache, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(9, 3, 64), (32, 8, 64), (4, 4, 128), (4, 2, 16)])
def test_fused_attention_equals_reference_on_mixed_batches(dtype, heads):
    from scheduler.worker.attention.fused import paged_attention

    tolerance = 2e-5 if dtype == torch.float32 else 2e-2
    for seed in range(8):
        q, k_cache, v_cache, meta = random_mixed_batch(seed, *heads, dtype)
        scale = heads[2] ** -0.5
        expected = ref_attention.paged_attention(q, k_cache, v_cache, meta, scale).float()
        got = paged_attention(q, k_cache, v_cache, meta, scale).float()
        assert torch.allclose(got, expected, atol=tolerance, rtol=tolerance), (seed, (got - expected).abs().max())


def within_one_bf16_step(got: torch.Tensor, expected: torch.Tensor, scale: float = 0.0) -> bool:
    """scale: magnitude of the inputs, where the result is a difference of rounded terms that may cancel."""
    return torch.allclose(got.float(), expected.float(), rtol=2**-7, atol=max(1e-6, scale * 2**-7))


def test_fused_layer_ops_agree_with_torch():
    from scheduler.worker.models import fused_ops
    from scheduler.worker.models.llama import RMSNorm, RotaryEmbedding

    torch.manual_seed(0)
    dtype = torch.bfloat16
    x, residual = torch.randn(7, 576, device="cuda", dtype=dtype), torch.randn(7, 576, device="cuda", dtype=dtype)
    norm = RMSNorm(576, 1e-5).to("cuda", dtype)
    norm.weight.data.normal_()
    normed, summed = fused_ops.add_rms_norm(x, residual, norm.weight, norm.eps)
    assert torch.equal(summed, x + residual)
    assert torch.allclose(normed.float(), norm(x + residual).float(), atol=1e-2, rtol=1e-2), \
        (normed.float() - norm(x + residual).float()).abs().max()
    gate_up = torch.randn(5, 2 * 1536, device="cuda", dtype=dtype)
    expected = torch.nn.functional.silu(gate_up[:, :1536]) * gate_up[:, 1536:]
    got = fused_ops.silu_mul(gate_up)
    assert within_one_bf16_step(got, expected), (got.float() - expected.float()).abs().max()

    config = tiny_config(hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    rotary = RotaryEmbedding(config, 512).to("cuda")
    qkv = torch.randn(6, (9 + 6) * 64, device="cuda", dtype=dtype)
    q, k, v = (t.view(6, -1, 64) for t in qkv.split([9 * 64, 3 * 64, 3 * 64], dim=-1))
    positions = torch.tensor([0, 3, 17, 200, 511, 1], device="cuda")
    q_ref, k_ref = rotary(positions, q.clone(), k.clone())
    k_cache = torch.zeros(4, 16, 3, 64, device="cuda", dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([0, 5, 16, -1, 63, 40], device="cuda")
    v_expected = v.clone()
    fused_ops.rope_and_cache(q, k, v, positions, rotary.cos, rotary.sin, k_cache, v_cache, slots)
    scale = qkv.abs().max().item()
    assert within_one_bf16_step(q, q_ref, scale), (q.float() - q_ref.float()).abs().max()
    assert within_one_bf16_step(k, k_ref, scale), (k.float() - k_ref.float()).abs().max()
    stored = slots >= 0
    assert torch.equal(k_cache.view(-1, 3, 64)[slots[stored]], k[stored])
    assert torch.equal(v_cache.view(-1, 3, 64)[slots[stored]], v_expected[stored])
    untouched = torch.ones(64, dtype=torch.bool, device="cuda")
    untouched[slots[stored]] = False
    assert not k_cache.view(-1, 3, 64)[untouched].any()


def test_cuda_graphs_greedy_matches_hf(tiny_model_dir):
    path, model = tiny_model_dir
    prompts = random_prompts(model.config.vocab_size)
    engine = Engine(model=str(path), device="cuda", dtype="float32", max_num_batched_tokens=32,
                    kv_cache_bytes=16 * 8192)  # small enough to preempt
    outputs = run_engine(engine, prompts, SamplingParams(temperature=0, max_tokens=24), arrive_every=1)
    assert engine.runner.graphs is not None and engine.runner.graphs.num_replays > 0
    assert [o.token_ids for o in outputs] == hf_references(model, prompts)
    assert_pool_idle(engine)


@pytest.mark.parametrize("speculative", ["off", "ngram"])
def test_outputs_with_graphs_equal_outputs_without(speculative):
    config = tiny_config(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=4096)
    rng = random.Random(0)
    prompts = [[rng.randrange(49152) for _ in range(n)] for n in (3, 40, 130, 600)] + [[7, 8, 9, 10] * 30]
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * 4 + [
        SamplingParams(temperature=0.8, seed=3, max_tokens=40, ignore_eos=True)]
    outputs = []
    for eager in (True, False):
        engine = Engine(model=config, load_format="dummy", device="cuda", enforce_eager=eager, max_num_seqs=8,
                        max_num_batched_tokens=2048, speculative=speculative, adaptive_speculation=False,
                        kv_cache_bytes=1 << 28)
        assert (engine.runner.graphs is None) == eager
        outputs.append([o.token_ids for o in run_engine(engine, prompts, params, arrive_every=2)])
        if not eager:  # decode steps and steps with prompt chunks both replayed graphs
            assert engine.runner.graphs.num_replays > engine.runner.graphs.num_mixed_replays > 0
        assert_pool_idle(engine)
        del engine
        torch.cuda.empty_cache()
    assert outputs[0] == outputs[1]


def test_draft_model_runs_through_graphs(tiny_model_dir):
    path, model = tiny_model_dir
    prompts = random_prompts(model.config.vocab_size)
    engine = Engine(model=str(path), device="cuda", dtype="float32", speculative="draft", draft_model=str(path),
                    adaptive_speculation=False, max_num_batched_tokens=64, max_num_seqs=256)
    outputs = run_engine(engine, prompts, SamplingParams(temperature=0, max_tokens=24), arrive_every=1)
    graphs = engine.speculator.proposer.runner.graphs
    num_chains = len(graphs.sizes) * (engine.config.num_speculative_tokens - 1)
    assert graphs.num_replays > 0 and len(graphs.chains) == num_chains
    assert len(graphs.proposals) == num_chains + len(graphs.sizes) and graphs.num_proposal_replays > 0
    assert [o.token_ids for o in outputs] == hf_references(model, prompts)
    # The draft is the target in float32: its chained passes must propose what the target then takes.
    drafted = sum(o.metrics.draft_tokens for o in outputs)
    assert drafted > 0 and sum(o.metrics.accepted_tokens for o in outputs) >= 0.95 * drafted
    assert_pool_idle(engine)


def test_greedy_chain_equals_passes_one_at_a_time():
    from scheduler.speculative.draft.runner import DraftRunner
    from scheduler.worker.models import load_model
    from scheduler.worker.runner import ForwardItem

    config = tiny_config(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=4096)
    model = load_model(config, None, "dummy", torch.float32, torch.device("cuda"), None).model
    runner = DraftRunner(model, num_blocks=64, block_size=16, dtype=torch.float32, device=torch.device("cuda"))
    runner.capture_graphs(max_num_seqs=4, max_query_len=5, max_model_len=512, max_chain=3)
    rng = random.Random(0)
    blocks = list(range(64))
    rng.shuffle(blocks)
    # Three sequences with histories of 5, 30 and 47 tokens (the last crosses a block boundary mid-chain).
    lengths = [5, 30, 47]
    tables = [[blocks.pop() for _ in range(-(-(n + 3) // 16))] for n in lengths]
    histories = [[rng.randrange(49152) for _ in range(n)] for n in lengths]
    runner.forward([ForwardItem(h, 0, t, 1) for h, t in zip(histories, tables)])
    first = torch.tensor([rng.randrange(49152) for _ in lengths], device="cuda")
    items = [ForwardItem([0], n, t, 1) for n, t in zip(lengths, tables)]
    chain = runner.greedy_chain(items, first, 3)
    assert chain.shape == (3, 3)
    tokens, expected = first, []
    for j in range(3):  # the same passes, one eager forward each, rewriting the same KV slots
        logits = eager_logits(runner, [ForwardItem([int(t)], n + j, tb, 1) for t, n, tb in
                                        zip(tokens.tolist(), lengths, tables)])
        tokens = logits.argmax(dim=-1)
        expected.append(tokens)
    assert torch.equal(chain, torch.stack(expected))
    # A chain that would run past a sequence's blocks is refused, not run.
    assert runner.greedy_chain([ForwardItem([0], 47, tables[2][:3], 1)], first[:1], 3) is None


@pytest.mark.parametrize("restricted", [False, True])
def test_greedy_proposal_equals_a_catch_up_then_passes_one_at_a_time(restricted):
    from scheduler.speculative.draft.runner import DraftRunner
    from scheduler.worker.models import load_model
    from scheduler.worker.runner import ForwardItem

    config = tiny_config(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=4096)
    model = load_model(config, None, "dummy", torch.float32, torch.device("cuda"), None).model
    rng = random.Random(1)
    if restricted:  # the draft's LM head over 4096 of the tokens
        model.restrict_vocab(torch.tensor(sorted(rng.sample(range(49152), 4096)), device="cuda"))
    runner = DraftRunner(model, num_blocks=64, block_size=16, dtype=torch.float32, device=torch.device("cuda"))
    runner.capture_graphs(max_num_seqs=4, max_query_len=5, max_model_len=512, max_chain=3, proposals=True)
    blocks = list(range(64))
    rng.shuffle(blocks)
    # Histories of 5, 30 and 47 tokens whose last 1, 3 and 5 the draft has yet to see; the chain after
    # the last crosses a block boundary.
    lengths, behind = [5, 30, 47], [1, 3, 5]
    tables = [[blocks.pop() for _ in range(-(-(n + 3) // 16))] for n in lengths]
    histories = [[rng.randrange(49152) for _ in range(n)] for n in lengths]
    runner.forward([ForwardItem(h[:n - b], 0, t, 1) for h, n, b, t in zip(histories, lengths, behind, tables)])
    items = [ForwardItem(h[n - b:], n - b, t, b) for h, n, b, t in zip(histories, lengths, behind, tables)]
    proposal = runner.greedy_proposal(items, 3)
    assert proposal.shape == (3, 4) and runner.graphs.num_proposal_replays == 1
    logits = eager_logits(runner, [ForwardItem(it.token_ids, it.start, it.block_table, 1) for it in items])
    tokens = model.token_ids(logits.argmax(dim=-1))
    expected = [tokens]
    for j in range(3):  # the same passes, one eager forward each, rewriting the same KV slots
        logits = eager_logits(runner, [ForwardItem([int(t)], n + j, tb, 1) for t, n, tb in
                                        zip(tokens.tolist(), lengths, tables)])
        tokens = model.token_ids(logits.argmax(dim=-1))
        expected.append(tokens)
    assert torch.equal(proposal, torch.stack(expected, dim=1))
    if restricted:
        assert set(proposal.flatten().tolist()) <= set(model.vocab_ids.tolist())
    # A proposal whose chain would run past a sequence's blocks, or whose catch-up is too long, is refused.
    assert runner.greedy_proposal([ForwardItem([0], 47, tables[2][:3], 1)], 3) is None
    assert runner.greedy_proposal([ForwardItem([0] * 6, 20, tables[1], 6)], 1) is None


@torch.inference_mode()
def eager_logits(runner, items):
    """What forward() returns, computed without graphs."""
    return runner.model.compute_logits(runner._forward_eager(items)).float()
