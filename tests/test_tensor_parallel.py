"""Tensor parallelism on the CPU (gloo, 2 ranks): the same greedy tokens as one process, with chunked
prefill, preemption, prefix-cache hits and speculation; every block returned; a lost rank fails the
daemon's live requests with INTERNAL and ends the daemon within the stall timeout."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from pathlib import Path

import grpc
import pytest
import torch

from scheduler import Engine, SamplingParams
from scheduler.worker.parallel import TensorParallel, kv_head_ids, local_heads
from server.proto.beastserve.v1 import generate_pb2_grpc as pb_grpc
from tests.conftest import DEFAULT_MODEL_BLOCK_BYTES, hf_greedy, save_tiny_model, tiny_config
from tests.daemon import Daemon
from tests.helpers import assert_pool_idle, run_engine
from tests.test_eagle import save_head, train_head
from tests.test_reliability import Outcome, greedy, read_stream
from tests.test_server import wait_pool_idle

MAX_TOKENS = 20
TINY_BLOCK_BYTES = 2 * 2 * 2 * 16 * 4 * 16  # layers x (k, v) x kv heads x head dim x fp32 x tokens, one process
STALL_TIMEOUT = 8
LONG = 500  # output tokens of a request that is still running when the test acts (max_model_len 512)


def _prompts() -> list[list[int]]:
    rng = random.Random(3)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (3, 17, 40, 75, 110)]
    shared = prompts[3][:64]  # four full blocks a later request finds in the prefix cache
    return prompts + [shared + [1, 2, 3], [7, 8, 9, 10, 11] * 12]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    path, model = tiny_model_dir
    draft = tmp_path_factory.mktemp("tp-draft")
    save_tiny_model(draft, tiny_config(num_hidden_layers=1), seed=11)
    head = tmp_path_factory.mktemp("tp-eagle-head")
    save_head(train_head(model, steps=40), model, head)
    prompts = _prompts()
    return path, {"draft": draft, "eagle": head}, prompts, [hf_greedy(model, p, MAX_TOKENS) for p in prompts]


def _tp_engine(path, **options) -> Engine:
    # Each rank holds one of the two KV heads: 14 blocks of the half size; rank 0's with the whole draft's KV
    # beside them (a 1-layer draft's being as large), or the EAGLE head's KV and features (twice as large).
    per_block = TINY_BLOCK_BYTES // 2 * {"draft": 2, "eagle": 3}.get(options.get("speculative"), 1)
    return Engine(model=str(path), dtype="float32", tensor_parallel_size=2, kv_cache_bytes=14 * per_block,
                  max_num_batched_tokens=32, **options)


SPECULATION = {
    "off": lambda made: {},
    "ngram": lambda made: dict(speculative="ngram", num_speculative_tokens=3, adaptive_speculation=False),
    "draft": lambda made: dict(speculative="draft", draft_model=str(made["draft"]), num_speculative_tokens=3,
                               adaptive_speculation=False),
    # The head on rank 0, reading the target's streams there.
    "eagle": lambda made: dict(speculative="eagle", eagle_head=str(made["eagle"]), num_speculative_tokens=3,
                               adaptive_speculation=False),
}


@pytest.mark.parametrize("speculation", SPECULATION)
def test_tp2_greedy_equals_one_process_with_chunks_preemption_prefix_hits(tiny, speculation):
    path, made, prompts, expected = tiny
    engine = _tp_engine(path, **SPECULATION[speculation](made))
    try:
        assert engine.pool.num_blocks == 14
        outputs = run_engine(engine, prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), arrive_every=1)
        assert [o.token_ids for o in outputs] == expected
        assert sum(o.metrics.preemptions for o in outputs) > 0
        again = run_engine(engine, prompts[3:4], SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
        assert again[0].token_ids == expected[3] and again[0].num_cached_tokens > 0
        if speculation != "off":
            assert sum(o.metrics.draft_tokens for o in outputs) > 0
        assert_pool_idle(engine)
    finally:
        engine.shutdown()


def test_tp2_aborts_return_every_block(tiny):
    path, _, prompts, _ = tiny
    engine = _tp_engine(path)
    try:
        streams = [engine.add_request(None, SamplingParams(temperature=0, max_tokens=150, ignore_eos=True),
                                      prompt_token_ids=p) for p in prompts[:3]]
        for _ in range(6):
            engine.step()
        for stream in streams[::2]:
            assert engine.abort(stream.request_id)
        while engine.has_unfinished():
            engine.step()
        assert_pool_idle(engine)
    finally:
        engine.shutdown()


def test_default_model_tp2_float32_equals_hf(default_tokenizer, default_hf_model):
    """9 query and 3 KV heads on 2 ranks: 4 and 5 query heads, each with its own copy of its KV head."""
    config = default_hf_model.config
    assert [local_heads(config, TensorParallel(r, 2)) for r in range(2)] == [(4, 4), (5, 5)]
    assert kv_head_ids(config, TensorParallel(1, 2)) == [1, 1, 2, 2, 2]
    texts = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
             "Write three words about the sea:"]
    prompts = [default_tokenizer(t)["input_ids"] for t in texts]
    expected = [hf_greedy(default_hf_model, p, 16) for p in prompts]
    per_block = DEFAULT_MODEL_BLOCK_BYTES // 3 * 5  # the rank with the most KV heads holds 5
    engine = Engine(model="default", dtype="float32", tensor_parallel_size=2, kv_cache_bytes=4 * per_block,
                    max_num_batched_tokens=16)
    try:
        outputs = run_engine(engine, prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        assert [o.token_ids for o in outputs] == expected
        assert sum(o.metrics.preemptions for o in outputs) > 0
        assert_pool_idle(engine)
    finally:
        engine.shutdown()


def test_a_model_that_does_not_split_is_refused_naming_the_field(tiny):
    path, *_ = tiny
    with pytest.raises(ValueError, match="tensor_parallel_size 3 .*intermediate_size 128"):
        Engine(model=str(path), dtype="float32", tensor_parallel_size=3)


def test_sharded_weights_hold_the_whole_model():
    """Each rank's shard of a dummy model, put back together, is the one-process model."""
    from scheduler.worker.models.loader import build_model

    config = tiny_config(num_attention_heads=4, num_key_value_heads=2, vocab_size=511, tie_word_embeddings=True)
    cpu = torch.device("cpu")
    whole = build_model(config, None, "dummy", torch.float32, cpu, 64)
    shards = [build_model(config, None, "dummy", torch.float32, cpu, 64, TensorParallel(r, 2)) for r in range(2)]
    layers, one = [s.model.layers[0] for s in shards], whole.model.layers[0]
    assert torch.equal(torch.cat([lay.self_attn.q_proj.weight for lay in layers]), one.self_attn.q_proj.weight)
    assert torch.equal(torch.cat([lay.self_attn.o_proj.weight for lay in layers], 1), one.self_attn.o_proj.weight)
    assert torch.equal(torch.cat([lay.mlp.down_proj.weight for lay in layers], 1), one.mlp.down_proj.weight)
    embed = torch.cat([s.model.embed_tokens.weight for s in shards])
    assert embed.shape[0] == 512 and torch.equal(embed[:511], whole.model.embed_tokens.weight)
    assert not embed[511:].any()  # the padding row past the vocabulary
    assert shards[1].lm_head.weight is shards[1].model.embed_tokens.weight


def _worker_pids(daemon: Daemon) -> list[int]:
    return [pid for pid in _children(daemon.proc.pid)
            if "scheduler.worker.ranks" in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")]


@pytest.fixture
def tp_daemon(tiny, tmp_path):
    path, *_ = tiny
    daemon = Daemon(path, "--tensor-parallel-size", "2", "--dtype", "float32", "--kv-cache-bytes", str(8 << 20),
                    "--stall-timeout", str(STALL_TIMEOUT), log_path=tmp_path / "daemon.log")
    yield daemon.wait_ready()
    daemon.close(timeout=30)


def test_tp2_daemon_answers_and_a_deadline_returns_every_block(tp_daemon, tiny):
    _, _, prompts, expected = tiny
    with tp_daemon.channel() as channel:
        stub = pb_grpc.GenerationStub(channel)
        reply = stub.Generate(greedy(prompts[2], MAX_TOKENS), timeout=60)
        assert list(reply.token_ids) == expected[2]
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(greedy(prompts[0], LONG), timeout=0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_pool_idle(stub)


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_lost_rank_fails_live_requests_internal_and_the_daemon_exits_nonzero(tp_daemon, fault):
    (worker,) = _worker_pids(tp_daemon)

    async def run():
        channel = grpc.aio.insecure_channel(tp_daemon.address)
        stub = pb_grpc.GenerationStub(channel)
        outcomes = [Outcome() for _ in range(4)]
        streams = [asyncio.ensure_future(read_stream(stub.GenerateStream(greedy([i + 1, 2], LONG), timeout=120), o))
                   for i, o in enumerate(outcomes)]
        while not all(o.tokens for o in outcomes):  # mid-way through their streams
            await asyncio.sleep(0.01)
        os.kill(worker, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        lost_at = time.monotonic()
        outcomes = await asyncio.gather(*streams)
        await channel.close()
        return outcomes, lost_at

    try:
        outcomes, lost_at = asyncio.run(run())
        for outcome in outcomes:
            assert outcome.tokens, "the stream had not started: not a mid-stream fault"
            assert outcome.code == grpc.StatusCode.INTERNAL and "engine failure" in outcome.details, outcome
        assert tp_daemon.proc.wait(timeout=STALL_TIMEOUT + 10) == 1
        assert time.monotonic() - lost_at < STALL_TIMEOUT + 5
        assert "rank 1" in tp_daemon.log()
    finally:
        if fault == "hung":  # the daemon kills its workers as it exits; this one must not outlive a failure
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)


def test_an_idle_daemon_whose_rank_dies_exits_nonzero_naming_it(tp_daemon):
    (worker,) = _worker_pids(tp_daemon)
    os.kill(worker, signal.SIGKILL)
    assert tp_daemon.proc.wait(timeout=10) == 1
    assert "rank 1 exited with code -9" in tp_daemon.log()


def test_a_failed_start_raises_once_and_leaves_no_worker(tiny, tmp_path):
    path, *_ = tiny
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:1000])
    before = _children(os.getpid())
    with pytest.raises(Exception, match="safetensors|header|incomplete|deserializ"):
        Engine(model=str(broken), dtype="float32", tensor_parallel_size=2)
    assert _children(os.getpid()) == before


def _children(pid: int) -> set[int]:
    tasks = Path(f"/proc/{pid}/task")
    return {int(child) for task in tasks.iterdir() for child in (task / "children").read_text().split()}
