"""Runs the engine's step loop in its own thread and hands each request's outputs to asyncio.

Cancellation and deadlines reach the engine: when a consumer stops early (client gone,
deadline hit, task cancelled), the request is aborted and its KV blocks are freed at the
next step. If a step raises, every live request is failed and the engine is marked dead.

A step's outputs reach the event loop in one hop (call_soon_threadsafe wakes the loop through a pipe: one write a
step, not one an output).

A request's consumer takes every output that waits for it at once, joined into one output per completion
(server/inbox.py): a consumer that falls behind the engine sends fewer, fuller messages rather than one a step.
Where the text decides nothing in the engine (no stop strings), the consumer makes it, on the event loop, from the
tokens it takes: one window decode a message, not one a token in the engine's step (scheduler/io/stream_text.py).

Backpressure: a request's outputs wait for its consumer in a list of at most about MAX_PENDING_OUTPUTS; at that
many the request is paused in the engine (not scheduled, so nothing more is generated for it; its blocks are kept
until others need them), and it runs again once its consumer has taken them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from scheduler import Engine, SamplingParams
from scheduler.core.outputs import RequestOutput
from scheduler.io.stream_text import made_by_reader, stream_text
from server.inbox import Inbox, coalesce

log = logging.getLogger(__name__)
THROUGHPUT_WINDOW_S = 10.0
MAX_PENDING_OUTPUTS = 64
IDLE_WAIT_S = 0.05  # the engine thread's sleep when a step found nothing to run (every live request paused)


class QueueFullError(Exception):
    pass


class EngineDeadError(Exception):
    pass


class RequestFailedError(Exception):
    """One request's own processing failed in the engine; the engine and the other requests go on."""


def delivered(outputs: list[RequestOutput], text, engine_dead: bool) -> list[RequestOutput]:
    """A call's joined outputs as it yields them: their text made where the reader makes it (text: a StreamText,
    or None); an output carrying an error raises, EngineDeadError where the engine is dead (its fault is set before
    it fails its requests), else RequestFailedError."""
    for output in outputs:
        if output.error is not None:
            raise (EngineDeadError if engine_dead else RequestFailedError)(output.error)
        if text is not None:
            text.fill(output)
    return outputs


class AsyncEngine:
    def __init__(self, engine: Engine, metrics=None, max_queue_size: int = 1024, stream_interval: int = 1):
        self.engine = engine
        self.stream_interval = stream_interval  # tokens a consumer is woken for (the first and the end at once)
        self.metrics = metrics
        self.max_queue_size = max_queue_size
        self.error: BaseException | None = None
        self.last_progress = time.monotonic()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._live: dict[str, _TokenTimer] = {}  # request id -> its timer
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        # For tests only: BEASTSERVE_TEST_FAULT_AFTER_STEPS=N makes step N+1 raise, to exercise the fault path.
        fault_after = os.environ.get("BEASTSERVE_TEST_FAULT_AFTER_STEPS")
        self._fault_after_steps = int(fault_after) if fault_after else None
        self._num_steps = 0
        self._calls: list[tuple[Callable, asyncio.AbstractEventLoop, asyncio.Future]] = []  # for the engine thread
        self._generated = deque()  # (time, tokens) of recent steps, for the generation rate
        self._kv_followers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []  # engine thread's own
        self._outbox: list[tuple[asyncio.AbstractEventLoop, Callable, RequestOutput]] = []  # engine thread's own

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self.engine.shutdown()

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def stalled_for(self) -> float:
        """Seconds since the last step while work is pending; 0 when idle."""
        if not self.engine.has_unfinished():
            return 0.0
        return time.monotonic() - self.last_progress

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       priority: int = 0, **options) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until the finished one. Raises ValueError for bad input,
        QueueFullError when too many wait, EngineDeadError when the engine has failed."""
        if not self.alive:
            raise EngineDeadError(f"engine is not running: {self.error!r}")
        if self.engine.num_waiting >= self.max_queue_size:
            raise QueueFullError(f"{self.engine.num_waiting} requests waiting; max_queue_size is "
                                 f"{self.max_queue_size}")
        loop = asyncio.get_running_loop()
        inbox = Inbox(loop, self.stream_interval, MAX_PENDING_OUTPUTS)
        timer = _TokenTimer(self.metrics)

        def receive(output: RequestOutput) -> None:  # on the loop, after add_request has returned the stream
            if inbox.put(output) >= MAX_PENDING_OUTPUTS:
                stream.paused = True

        def on_output(output: RequestOutput) -> None:  # engine thread
            timer.observe(output)
            if threading.current_thread() is self._thread:
                self._outbox.append((loop, receive, output))  # posted with the step's others (_flush)
            else:
                _post(loop, receive, output)

        detokenize = options.pop("detokenize", True)
        reader_made = detokenize and made_by_reader(params, self.engine.tokenizer)  # the text made here, not there
        try:
            stream = self.engine.add_request(None, params, request_id=request_id, priority=priority,
                                             prompt_token_ids=prompt_token_ids, on_output=on_output,
                                             detokenize=detokenize and not reader_made, **options)
        except RuntimeError as exc:  # the engine failed between the alive check and now
            raise EngineDeadError(str(exc)) from None
        text = stream_text(self.engine, prompt_token_ids, params) if reader_made else None
        self._live[request_id] = timer
        self._wake.set()
        finished, unfinished = False, params.n  # done when all n completions are
        try:
            while not finished:
                # Every delta that came since the consumer last asked, one output per completion (inbox.py).
                outputs = coalesce(await inbox.take())
                if stream.paused:  # the consumer has taken everything it had
                    stream.paused = False
                    self._wake.set()
                for output in delivered(outputs, text, self.error is not None):
                    unfinished -= output.finished
                    finished = unfinished == 0
                    yield output
        finally:
            self._live.pop(request_id, None)
            if not finished:  # the caller went away (cancelled, deadline): the service counts how it ended
                self.engine.abort(request_id)
                self._wake.set()

    async def run_in_engine_thread(self, fn: Callable):
        """fn() between two steps (or at once when idle), in the engine's thread, which owns the engine's state."""
        return await self._call_soon(fn, asyncio.get_running_loop())

    async def reset_prefix_cache(self) -> int:
        """Drop the prefix cache's unused blocks between two steps; how many were dropped."""
        return await self.run_in_engine_thread(self.engine.pool.reset_prefix_cache)

    def _call_soon(self, fn: Callable, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        future = loop.create_future()
        self._calls.append((fn, loop, future))
        self._wake.set()
        return future

    async def follow_kv_cache(self) -> AsyncIterator[list]:
        """The prefix cache's events (kv_cache.BlockStored, BlockRemoved, CacheCleared), a list per engine step
        that changed it; the first list is the cache's contents when following began."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        follower = (loop, queue)

        def start() -> list:
            if self._kv_followers:  # already recording: the others get what they have not seen yet
                self._publish_kv_events()
            else:
                self.engine.pool.record_events(True)
            self._kv_followers.append(follower)
            return self.engine.pool.cached_contents()

        def stop() -> None:
            self._kv_followers.remove(follower)
            if not self._kv_followers:
                self.engine.pool.record_events(False)

        yield await self.run_in_engine_thread(start)
        try:
            while True:
                yield await queue.get()
        finally:
            if self.alive:
                self._call_soon(stop, loop)  # not awaited: the subscriber may already be gone

    def _publish_kv_events(self) -> None:
        events = self.engine.pool.take_events()
        if events:
            for loop, queue in self._kv_followers:
                _post(loop, queue.put_nowait, events)

    def generation_tokens_per_s(self, window_s: float = THROUGHPUT_WINDOW_S) -> float:
        """Tokens generated per second over the last window."""
        now = time.monotonic()
        recent = [n for t, n in list(self._generated) if t > now - window_s]
        return sum(recent) / window_s

    def _run_calls(self) -> None:
        while self._calls:
            fn, loop, future = self._calls.pop(0)
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - the caller gets it
                self._flush()
                _post(loop, _settle, future, None, exc)
            else:
                self._flush()
                _post(loop, _settle, future, result, None)
            if self._kv_followers:  # a call may change the cache (a flush)
                self._publish_kv_events()

    def abort(self, request_ids: list[str]) -> list[str]:
        """Abort these requests (finish_reason "abort"); returns the ids of those that were live."""
        aborted = [rid for rid in request_ids if self.engine.abort(rid)]
        self._wake.set()
        return aborted

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._run_calls()
                if not self.engine.has_unfinished():
                    if (fault := self.engine.fault()) is not None:  # a tensor-parallel rank died while idle
                        raise RuntimeError(f"tensor parallelism: {fault}")
                    self.last_progress = time.monotonic()
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                if self._num_steps == self._fault_after_steps:
                    raise RuntimeError("injected fault")
                outputs = self.engine.step()
                self._flush()
                self._num_steps += 1
                self.last_progress = time.monotonic()
                self._count_generated(self.engine.last_step_stats.num_generation_tokens)
                if self._kv_followers:
                    self._publish_kv_events()
                if self.metrics is not None:
                    stats = self.engine.last_step_stats
                    self.metrics.record_step(stats)
                    if stats.num_drafts:
                        self.metrics.record_spec_decode(stats.num_drafts, stats.num_draft_tokens,
                                                        stats.accepted_per_position)
                if not (outputs or self.engine.last_step_stats.num_batched_tokens or self.engine.admission.compiling):
                    self._wake.wait(timeout=IDLE_WAIT_S)  # nothing could run: until a request comes, ends or resumes
                    self._wake.clear()
        except BaseException as exc:  # noqa: BLE001 - any fault must fail the requests, not hang them
            log.exception("engine step failed; failing %d live requests", len(self._live))
            self.error = exc
            self.engine.fail_all(f"engine fault: {exc!r}")
        finally:
            self._flush()

    def _flush(self) -> None:
        """Post the outputs the engine gave since the last flush, in order: one hop onto each event loop."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for loop, receive, output in outbox:
            by_loop.setdefault(loop, []).append((receive, output))
        for loop, calls in by_loop.items():
            _post(loop, _receive_all, calls)


    def _count_generated(self, num_tokens: int) -> None:
        now = time.monotonic()
        if num_tokens:
            self._generated.append((now, num_tokens))
        while self._generated and self._generated[0][0] < now - THROUGHPUT_WINDOW_S:
            self._generated.popleft()


def _post(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """fn(*args) on the loop, from the engine thread; a loop already closed (the server stopping) gets nothing."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def _receive_all(calls: list[tuple[Callable, RequestOutput]]) -> None:
    for receive, output in calls:
        receive(output)


def _settle(future: asyncio.Future, result, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


class _TokenTimer:
    """Per-request inter-token latency, observed in the engine thread as outputs are produced. How a request ended
    is counted by its caller (server/calls.py), once."""

    def __init__(self, metrics):
        self.metrics = metrics
        self.last = time.monotonic()
        self.seen_first = False

    def observe(self, output: RequestOutput) -> None:
        if self.metrics is None or not output.token_ids:
            return
        now = time.monotonic()
        if self.seen_first:
            self.metrics.record_inter_token(now - self.last, len(output.token_ids))
        self.seen_first = True
        self.last = now
