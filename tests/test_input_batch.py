"""The persistent batch (scheduler/worker/input_batch.py): a request takes a row when it first holds KV blocks, its
row follows its blocks as they grow, and it gives the row up when its blocks are freed (finished, aborted or
preempted), for the next request to reuse."""

from __future__ import annotations

import numpy as np

from scheduler import Engine, SamplingParams
from scheduler.core.kv_cache import BlockPool
from scheduler.core.request import Request
from scheduler.worker.input_batch import InputBatch
from tests.helpers import assert_pool_idle

BLOCK_BYTES = 8192  # one 16-token block of the tiny model's KV cache


def _sync(batch: InputBatch, pool: BlockPool) -> None:
    batch.sync(*pool.take_row_changes(), pool.req_block_ids)


def _assert_rows_follow_the_pool(batch: InputBatch, pool: BlockPool) -> None:
    """Every request holding blocks has a row of its own holding its block ids, and no other request has one."""
    assert set(batch.row_of) == set(pool.req_block_ids)
    assert len(set(batch.row_of.values())) == len(batch.row_of)
    for seq_id, ids in pool.req_block_ids.items():
        row = batch.row_of[seq_id]
        assert batch.num_blocks[row] == len(ids)
        assert batch.block_tables[row, :len(ids)].tolist() == ids


def test_rows_are_taken_grown_given_up_and_reused():
    pool, batch = BlockPool(num_blocks=32, block_size=4), InputBatch(num_rows=2, width=2)
    a, b, c = (Request(f"seq-{i}", [1] * 5, SamplingParams()) for i in range(3))
    pool.allocate(a, 10)  # three blocks: wider than the table's two columns
    pool.allocate(b, 4)
    _sync(batch, pool)
    _assert_rows_follow_the_pool(batch, pool)
    row_a = batch.row_of["seq-0"]

    pool.free(a)  # a finishes; c joins in the same step and reuses its row, whose old ids it overwrites
    pool.allocate(c, 6)
    _sync(batch, pool)
    assert batch.row_of["seq-2"] == row_a and "seq-0" not in batch.row_of
    _assert_rows_follow_the_pool(batch, pool)

    pool.allocate(b, 13)  # b grows by three blocks
    pool.free(c)  # c is preempted and comes back in the same interval, with other blocks
    pool.allocate(c, 9)
    _sync(batch, pool)
    _assert_rows_follow_the_pool(batch, pool)

    more = [Request(f"seq-{i}", [2] * 3, SamplingParams()) for i in range(3, 6)]
    for request in more:  # past the two rows the batch began with
        pool.allocate(request, 3)
    child = Request("seq-9", [1] * 5, SamplingParams())
    pool.fork(b, child, 2)  # a forked completion shares two of b's blocks
    _sync(batch, pool)
    _assert_rows_follow_the_pool(batch, pool)
    tables, num_blocks = batch.tables(batch.rows(["seq-1", "seq-9"]))
    assert num_blocks.tolist() == [4, 2] and tables.shape == (2, 4)
    assert tables[1, :2].tolist() == pool.req_block_ids["seq-1"][:2]

    for request in [b, c, child, *more]:
        pool.free(request)
    _sync(batch, pool)
    assert not batch.row_of and not batch.num_blocks.any()


def test_rows_follow_requests_through_preemption_and_abort_and_greedy_output_is_unchanged(tiny_model_dir):
    path, _ = tiny_model_dir
    prompts = [[(7 * i + j) % 500 + 1 for j in range(24 + 5 * i)] for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=40)
    roomy = Engine(model=str(path))
    expected = [_tokens(s) for s in _run(roomy, prompts, params)]

    # 12 blocks for five requests that each grow to 5 blocks: requests are preempted, and come back.
    engine = Engine(model=str(path), kv_cache_bytes=12 * BLOCK_BYTES)
    batch, pool = engine.executor.row_inputs.batch, engine.pool
    streams = [engine.add_request(None, params, prompt_token_ids=p) for p in prompts]
    aborted = engine.add_request(None, params, prompt_token_ids=prompts[0])
    steps, rows_used, preempted = 0, set(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        if steps == 6:
            engine.abort(aborted.request_id)
        _sync(batch, pool)
        _assert_rows_follow_the_pool(batch, pool)
        rows_used |= set(batch.row_of.values())
        preempted += engine.last_step_stats.num_preemptions
    assert preempted > 0
    assert len(rows_used) < len(streams) + 1  # rows given up were taken again
    assert [_tokens(s) for s in streams] == expected
    assert _tokens(aborted)[-1] == "abort"
    assert_pool_idle(engine)
    _sync(batch, pool)
    assert not batch.row_of and np.all(batch.num_blocks == 0)


def _run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list:
    streams = [engine.add_request(None, params, prompt_token_ids=p) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return streams


def _tokens(stream) -> list:
    """Every token of a stream's outputs, then its finish reason."""
    tokens, reason = [], None
    while (output := stream.get_nowait()) is not None:
        tokens += output.token_ids
        reason = output.finish_reason or reason
    return tokens + [reason]
