"""The daemon's side of an engine core in a process of its own (--engine-core process): ProcessEngine serves the
services as AsyncEngine does (generate, abort, the cache flush, KV events, the load), with the engine stepping in
server/core_process.py.

Two threads carry the pipe: a writer that sends what the event loop queued (requests, aborts, pauses, calls) as one
message a turn, and a reader that unpacks each step's message and hands it to the loop in one hop. The tokenizer,
chat templates and grammar checks stay here, at the edge; so does the text of requests without stop strings, made
by each call from the tokens it takes (scheduler/io/stream_text.py). Text that stop strings are matched in is made
in the core.

If the core dies (a step raises, or the process is killed), every request in flight ends with an error at once and
`alive` turns false: the daemon's watchdog then turns readiness NOT_SERVING and exits."""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import pickle
import threading
import time
from collections import deque
from collections.abc import AsyncIterator

from scheduler import SamplingParams
from scheduler.core.outputs import RequestOutput
from scheduler.io.stream_text import made_by_reader, stream_text
from scheduler.loop.collector import tune_gc
from server.async_engine import (
    MAX_PENDING_OUTPUTS,
    THROUGHPUT_WINDOW_S,
    EngineDeadError,
    QueueFullError,
    _TokenTimer,
    delivered,
)
from server.core_process import run_core
from server.core_view import CoreView
from server.inbox import Inbox, coalesce

log = logging.getLogger(__name__)
START_POLL_S = 1.0
STOP_WAIT_S = 10.0


class _Route:
    """Where one request's outputs go on the event loop."""

    __slots__ = ("inbox", "timer", "unfinished", "paused", "rejected", "abandoned")

    def __init__(self, inbox: Inbox, timer: _TokenTimer | None, num_completions: int):
        self.inbox, self.timer, self.unfinished = inbox, timer, num_completions
        self.paused = False
        self.rejected: str | None = None  # why the core refused the request
        self.abandoned = False  # its consumer left: the core's abort is on its way, outputs until then are dropped


class ProcessEngine:
    """AsyncEngine's interface over an engine core in another process (start it with `launch`)."""

    def __init__(self, view: CoreView, process, conn, metrics=None, max_queue_size: int = 1024,
                 stream_interval: int = 1):
        self.engine = view  # what the services read of the engine
        self.process, self.conn = process, conn
        self.metrics = metrics
        self.max_queue_size = max_queue_size
        self.stream_interval = stream_interval
        self.error: BaseException | None = None
        self.last_progress = time.monotonic()
        self._routes: dict[str, _Route] = {}
        self._calls: dict[int, tuple[asyncio.Future, object]] = {}
        self._call_ids = itertools.count()
        self._kv_followers: list[asyncio.Queue] = []
        self._generated = deque()  # (time, tokens) of recent steps, for the generation rate
        self._outgoing: list[tuple] = []
        self._outgoing_lock = threading.Lock()
        self._wake_writer = threading.Event()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader = threading.Thread(target=self._read, name="core-reader", daemon=True)
        self._writer = threading.Thread(target=self._write, name="core-writer", daemon=True)

    @classmethod
    async def launch(cls, engine_config, build_engine, **options) -> ProcessEngine:
        """Start the core process, which builds its engine with build_engine(engine_config, serving=True) (a
        picklable callable), and wait until it is ready. RuntimeError says why it could not start."""
        context = multiprocessing.get_context("spawn")  # not fork: gRPC's threads are running here
        conn, child_conn = context.Pipe()
        process = context.Process(target=run_core, args=(child_conn, engine_config, build_engine),
                                  name="beastserve-engine-core")
        process.start()
        child_conn.close()  # the core's end lives in the core alone: its death closes the pipe
        try:
            message = await asyncio.to_thread(_first_message, conn, process)
        except BaseException:
            _end_process(process)
            conn.close()
            raise
        if message[0] == "failed":
            _end_process(process)
            conn.close()
            raise RuntimeError(f"the engine core failed to start: {message[1]}")
        view = CoreView(message[1])
        # As the engine does in its process: what start-up made frozen out of collections, and young collections
        # past what a step's outputs hold at once (the reader thread allocates them; at the default threshold
        # full collections cost seconds a run).
        tune_gc(view.config.max_num_seqs)
        served = cls(view, process, conn, **options)
        served.start()
        log.info("engine core running in process %d", process.pid)
        return served

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._reader.start()
        self._writer.start()

    def stop(self) -> None:
        """Stop the core (it finishes nothing more), wait for it to exit and reap it."""
        self._closing = True
        self._send(("stop",))
        self._writer.join(timeout=STOP_WAIT_S)
        _end_process(self.process, STOP_WAIT_S)
        self._reader.join(timeout=STOP_WAIT_S)
        self.conn.close()

    @property
    def alive(self) -> bool:
        return self.error is None and self.process.is_alive()

    def stalled_for(self) -> float:
        """Seconds since the core's last message while requests are in flight; 0 when idle."""
        if not self._routes:
            return 0.0
        return time.monotonic() - self.last_progress

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       priority: int = 0, **options) -> AsyncIterator[RequestOutput]:
        """As AsyncEngine.generate: the request's outputs until the finished one."""
        if not self.alive:
            raise EngineDeadError(f"engine is not running: {self.error!r}")
        if self.engine.num_waiting >= self.max_queue_size:
            raise QueueFullError(f"{self.engine.num_waiting} requests waiting; max_queue_size is "
                                 f"{self.max_queue_size}")
        if request_id in self._routes:
            raise ValueError(f"request_id: {request_id!r} is already in use by a request in flight")
        if not self._routes:
            self.last_progress = time.monotonic()  # the core had nothing to do: no stall so far
        inbox = Inbox(asyncio.get_running_loop(), self.stream_interval, MAX_PENDING_OUTPUTS)
        route = _Route(inbox, _TokenTimer(self.metrics) if self.metrics is not None else None, params.n)
        self._routes[request_id] = route
        self.engine.adds_sent += 1
        detokenize = options.pop("detokenize", True)
        # Text that decides nothing in the core (no stop strings) is made here, from the tokens each read takes.
        text = stream_text(self.engine, prompt_token_ids, params) \
            if detokenize and made_by_reader(params, self.engine.tokenizer) else None
        options["detokenize"] = detokenize and text is None
        self._send(("add", request_id, prompt_token_ids, params, priority, options))
        finished, unfinished = False, params.n
        try:
            while not finished:
                outputs = coalesce(await inbox.take())
                if route.rejected is not None:
                    raise ValueError(route.rejected)
                if route.paused:  # the consumer has taken everything it had
                    route.paused = False
                    self._send(("resume", request_id))
                for output in delivered(outputs, text, self.error is not None):
                    unfinished -= output.finished
                    finished = unfinished == 0
                    yield output
        finally:
            if not finished and self._routes.get(request_id) is route:  # the caller went away: abort it there
                route.abandoned = True
                self._send(("abort", [request_id]))

    def abort(self, request_ids: list[str]) -> list[str]:
        """Abort these requests (finish_reason "abort"); returns the ids of those that were live."""
        live = [rid for rid in request_ids if rid in self._routes and not self._routes[rid].abandoned]
        if live:
            self._send(("abort", live))
        return live

    async def reset_prefix_cache(self) -> int:
        """Drop the prefix cache's unused blocks between two steps; how many were dropped."""
        return await self._call("reset_prefix_cache")

    async def follow_kv_cache(self) -> AsyncIterator[list]:
        """As AsyncEngine.follow_kv_cache: the cache's contents, then its events a list per step that changed it."""
        queue = asyncio.Queue()

        def joined(future: asyncio.Future) -> None:  # on the reply, before any later step's events are handed out
            if future.cancelled():
                self._send(("call", next(self._call_ids), "kv_unfollow"))
            else:
                self._kv_followers.append(queue)

        yield await self._call("kv_follow", joined)
        try:
            while (events := await queue.get()) is not None:
                yield events
            raise EngineDeadError(f"engine is not running: {self.error!r}")  # the core died: no more events
        finally:
            if queue in self._kv_followers:
                self._kv_followers.remove(queue)
                if self.alive:
                    self._send(("call", next(self._call_ids), "kv_unfollow"))

    def generation_tokens_per_s(self, window_s: float = THROUGHPUT_WINDOW_S) -> float:
        """Tokens generated per second over the last window."""
        now = time.monotonic()
        return sum(n for t, n in list(self._generated) if t > now - window_s) / window_s

    def _call(self, name: str, on_reply=None) -> asyncio.Future:
        if not self.alive:
            raise EngineDeadError(f"engine is not running: {self.error!r}")
        future = self._loop.create_future()
        call_id = next(self._call_ids)
        self._calls[call_id] = (future, on_reply)
        self._send(("call", call_id, name))
        return future

    def _send(self, message: tuple) -> None:
        with self._outgoing_lock:
            self._outgoing.append(message)
        self._wake_writer.set()

    def _write(self) -> None:
        """The writer thread: what the loop queued, as one message a turn, so the loop never waits on the pipe."""
        while True:
            self._wake_writer.wait()
            self._wake_writer.clear()
            with self._outgoing_lock:
                messages, self._outgoing = self._outgoing, []
            if messages:
                try:
                    self.conn.send_bytes(pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL))
                except (OSError, ValueError):  # the core is gone: the reader says so
                    return
            if self._closing:
                return

    def _read(self) -> None:
        """The reader thread: each message unpacked here, handed to the loop in one hop."""
        from server.core_wire import unpack_outputs

        try:
            while True:
                message = pickle.loads(self.conn.recv_bytes())
                if message[0] == "batch":
                    _, packed, notes, stats, facts = message
                    self._post(self._on_batch, unpack_outputs(packed), notes, stats, facts)
                else:
                    assert message[0] == "fault", message[0]
                    self._post(self._fail, message[1])
                    return
        except (EOFError, OSError):
            if self._closing:
                return
            self.process.join(timeout=1.0)  # reaped here: no zombie, and its exit code for the log
            self._post(self._fail, f"the engine core process died (exit code {self.process.exitcode})")

    def _post(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is stopping
            pass

    def _on_batch(self, outputs: list[RequestOutput], notes: list, stats, facts) -> None:
        """On the loop: a step's outputs to their requests, then the notes in order, then the step's figures."""
        self.last_progress = time.monotonic()
        self.engine.update(facts)
        routes = self._routes
        for output in outputs:
            route = routes.get(output.request_id)
            if route is None:
                continue
            if not route.abandoned:
                if route.timer is not None:
                    route.timer.observe(output)
                if route.inbox.put(output) >= MAX_PENDING_OUTPUTS and not route.paused:
                    route.paused = True
                    self._send(("pause", output.request_id))
            if output.finished:
                route.unfinished -= 1
                if not route.unfinished:
                    del routes[output.request_id]
        for note in notes:
            self._on_note(note)
        if stats is not None:
            self._on_step(stats)

    def _on_note(self, note: tuple) -> None:
        kind = note[0]
        if kind == "rejected":
            _, request_id, why = note
            route = self._routes.pop(request_id, None)
            if route is not None:
                route.rejected = why
                route.inbox.put(RequestOutput(request_id, [], "", finished=True, finish_reason="abort", error=why))
        elif kind == "reply":
            _, call_id, result, error = note
            future, on_reply = self._calls.pop(call_id, (None, None))
            if future is None:
                return
            if on_reply is not None:
                on_reply(future)
            if not future.done():
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(RuntimeError(error))
        else:
            assert kind == "kv", kind
            for queue in self._kv_followers:
                queue.put_nowait(note[1])

    def _on_step(self, stats) -> None:
        now = time.monotonic()
        if stats.num_generation_tokens:
            self._generated.append((now, stats.num_generation_tokens))
        while self._generated and self._generated[0][0] < now - THROUGHPUT_WINDOW_S:
            self._generated.popleft()
        if self.metrics is not None:
            self.metrics.record_step(stats)
            if stats.num_drafts:
                self.metrics.record_spec_decode(stats.num_drafts, stats.num_draft_tokens, stats.accepted_per_position)

    def _fail(self, why: str) -> None:
        """On the loop: the core is gone. Every request in flight ends with the error; calls and followers too."""
        if self.error is None:
            self.error = EngineDeadError(why)
            log.error("%s; failing %d live requests", why, len(self._routes))
        for request_id, route in self._routes.items():
            if not route.abandoned:
                route.inbox.put(RequestOutput(request_id, [], "", finished=True, finish_reason="abort", error=why))
        self._routes.clear()
        for future, _ in self._calls.values():
            if not future.done():
                future.set_exception(EngineDeadError(why))
        self._calls.clear()
        for queue in self._kv_followers:
            queue.put_nowait(None)
        self._kv_followers.clear()


def _first_message(conn, process) -> tuple:
    """The core's "ready" or "failed", or RuntimeError if it exits without a word."""
    while not conn.poll(START_POLL_S):
        if not process.is_alive():
            raise RuntimeError(f"the engine core exited with code {process.exitcode} before it was ready")
    try:
        return pickle.loads(conn.recv_bytes())
    except EOFError:
        process.join(timeout=START_POLL_S)
        raise RuntimeError(f"the engine core exited with code {process.exitcode} before it was ready") from None


def _end_process(process, wait_s: float = STOP_WAIT_S) -> None:
    """Wait for the core to exit, then terminate, then kill it; reaped either way."""
    process.join(timeout=wait_s)
    for end in (process.terminate, process.kill):
        if process.exitcode is not None:
            return
        end()
        process.join(timeout=wait_s / 2)
