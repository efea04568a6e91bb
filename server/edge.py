"""Per-request work at the edge that grows with what the client sent (tokenising a long prompt, rendering a chat
template, compiling a grammar): after the cheap limits, off the event loop, in small pools, so one client can
neither stall the loop (health checks, every other stream) nor take all the threads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from scheduler.structured.compiler import grammar_error

if TYPE_CHECKING:
    from scheduler import Engine, SamplingParams

# Text this short tokenises in a few milliseconds (16 KiB: ~4 ms on the default model): cheaper on the loop than a
# hop to a thread and back.
INLINE_TEXT_BYTES = 16 << 10


class EdgeWork:
    """The pool for tokenising and chat templates (grammars compile in the engine's own pool)."""

    def __init__(self, max_workers: int = 2):
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="edge")

    async def call(self, size: int, fn: Callable, *args):
        """fn(*args) for an input of `size` characters: on the loop when small, else in the pool."""
        if size <= INLINE_TEXT_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    @staticmethod
    async def compile_grammar(engine: Engine, params: SamplingParams) -> None:
        """Compile the request's grammar, if it has one, before it is queued: the engine then finds it compiled.
        A grammar that fails is a ValueError naming the field."""
        future = engine.compile_grammar(params)
        if future is None:
            return
        try:
            # Shielded: other requests may wait on the same compile, which a client leaving must not cancel.
            await asyncio.shield(asyncio.wrap_future(future))
        except Exception as exc:  # noqa: BLE001 - whatever failed the compile, the grammar caused it
            raise grammar_error(params.structured_outputs, exc) from None
