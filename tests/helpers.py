"""Drive an Engine the way the server will: requests arriving while it steps."""

from __future__ import annotations

from scheduler import Engine, SamplingParams
from scheduler.core.outputs import CompletionOutput


def run_engine(engine: Engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
               arrive_every: int = 0, max_steps: int = 10_000) -> list[CompletionOutput]:
    """Add prompt i at step i * arrive_every (all at once when 0), step until all finish."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    results, streams = [], []
    step = 0
    while len(streams) < len(prompts) or not all(s.finished for s in streams):
        while len(streams) < len(prompts) and step >= len(streams) * arrive_every:
            i = len(streams)
            streams.append(engine.add_request(None, params[i], prompt_token_ids=prompts[i]))
            results.append(CompletionOutput(streams[-1].request_id, prompts[i]))
        engine.step()
        step += 1
        assert step < max_steps, "engine made no progress"
    for result, stream in zip(results, streams):
        while (delta := stream.get_nowait()) is not None:
            result.add(delta)
    return results


def assert_pool_idle(engine: Engine) -> None:
    """Invariant 3: with no live request, every block is free (cached ones included) and unreferenced."""
    pool = engine.pool
    assert not engine.has_unfinished()
    assert pool.num_free_blocks == pool.num_blocks
    assert all(block.ref_cnt == 0 for block in pool.blocks)
    assert not pool.req_blocks
