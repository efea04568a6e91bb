"""EAGLE drafts inside the overlapped loop (speculation_in_loop): proposed while the step before is in flight,
from its tokens on the device, and still what the dense head predicts at each request's true length."""

from __future__ import annotations

import pytest

from scheduler import SamplingParams
from tests.helpers import assert_pool_idle, run_engine
from tests.test_eagle import MAX_TOKENS, assert_drafts_are_dense, draft_every_other_step, eagle_engine, setup

__all__ = ["setup"]  # the module's fixture: a tiny target, its head, prompts and their greedy answers


@pytest.mark.parametrize("every_other", [False, True])
def test_drafts_in_the_loop_are_the_dense_heads_predictions(setup, every_other):
    """speculation_in_loop: a step's proposal is made while the step before is in flight, the head catching up
    over that step's tokens on the device and dropping there the drafts it did not accept. Every proposal is
    still what unroll() predicts at the request's true length, and greedy output is unchanged. Chunked prompts,
    preemption and a prefix-cache hit included; every_other: steps without drafts between, whose rows the device
    moves on by what the step with drafts before accepted (the head's features are stored where they land)."""
    path, model, head_dir, prompts, expected = setup
    engine = eagle_engine(path, head_dir, kv_cache_bytes=14 * 2 * 8192, max_num_batched_tokens=32,
                          adaptive_speculation=False, speculation_in_loop=True)
    proposer = engine.speculator.proposer
    assert engine.executor.loop is not None
    if every_other:
        draft_every_other_step(engine)
    seen, chains, propose_in_loop, chain_after = [], [], proposer.propose_in_loop, proposer.runner.chain_after
    followed = dropped_rows = 0  # rows of a step in flight caught up over, and those of them dropped

    def spy_chain(items, device_tokens, back, passes):
        nonlocal followed, dropped_rows
        chains.append((items, back.tolist()))
        followed += sum(item.num_device_tokens for item in items)
        dropped_rows += sum(chains[-1][1])
        return chain_after(items, device_tokens, back, passes)

    def spy(spec, previous, pool, k):
        drafts, found = propose_in_loop(spec, previous, pool, k)
        items, back = chains.pop()
        for s, item, dropped, row in zip(spec, items, back, drafts.tolist()):
            # The head's last real row sits at the request's true length - 2 (it reads the last token).
            seen.append((tuple(s.request.prompt_token_ids), item.start + len(item.token_ids) - dropped + 1, row))
        return drafts, found

    proposer.runner.chain_after, proposer.propose_in_loop = spy_chain, spy
    outputs = run_engine(engine, prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), arrive_every=1)
    assert [o.token_ids for o in outputs] == expected
    assert sum(o.metrics.preemptions for o in outputs) > 0 and outputs[-1].num_cached_tokens > 0
    # Proposals after steps in flight; after steps with drafts, some not accepted (every_other: none such).
    assert followed > dropped_rows and (dropped_rows > 0) != every_other
    compared = assert_drafts_are_dense(model, proposer.head, seen, {tuple(p): p + e for p, e in zip(prompts, expected)})
    assert compared > len(seen)
    assert sum(o.metrics.draft_tokens for o in outputs) > 0
    assert_pool_idle(engine)
