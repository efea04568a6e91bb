"""What every generation service does with a call: find an engine that can take it, run one request on it to
its end or to an explicit status, and count how each call ended (once). Only generation calls are counted:
Tokenize, GetLoad and the like never are."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import grpc

from scheduler import SamplingParams
from scheduler.core.outputs import RequestOutput
from server.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestFailedError
from server.config import ServerConfig
from server.convert import field_error
from server.edge import EdgeWork
from server.metrics import RequestTally

log = logging.getLogger(__name__)
DEADLINE_SLACK_S = 0.1
# How long a call whose client stopped reading waits for its status to be taken; the status is queued behind the
# unread messages either way, and reaches a client that reads again.
STATUS_WAIT_S = 1.0


class StreamWriteTimeout(Exception):
    """The client read nothing for --stream-write-timeout seconds."""


class WriteDeadline:
    """Bounds how long one stream's writes may wait for its client. A write waits while the transport's flow control
    holds the message (grpc.aio's context.write, while the client's HTTP/2 window is full); one left waiting
    `timeout` seconds raises StreamWriteTimeout. One timer per call, re-armed lazily, rather than one per message:
    asyncio.timeout() costs ~17 us a write, this ~1 us."""

    def __init__(self, timeout: float):
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.timeout = timeout
        self.started: float | None = None  # when the write in progress began
        self.expired = False
        self.timer = self.loop.call_later(timeout, self._check)

    async def write(self, context, message) -> None:
        self.started = self.loop.time()
        try:
            await context.write(message)
        except asyncio.CancelledError:
            if not self.expired:
                raise
            self.task.uncancel()  # cancelled by _check, not by the client: this call goes on to end with its status
            raise StreamWriteTimeout(f"the client read nothing for {self.timeout:g} s (--stream-write-timeout); "
                                     "the request was ended") from None
        finally:
            self.started = None

    def close(self) -> None:
        self.timer.cancel()

    def _check(self) -> None:
        started = self.started
        if started is not None and self.loop.time() - started >= self.timeout:
            self.expired = True
            self.task.cancel()  # the task waits in write(): the cancellation lands there
            return
        self.timer = self.loop.call_at((self.loop.time() if started is None else started) + self.timeout,
                                       self._check)


@dataclass
class ServerState:
    """What the services share. `engine` is None until the model is loaded and warmed."""

    config: ServerConfig
    metrics: object | None = None
    engine: AsyncEngine | None = None
    draining: bool = False
    # One entry per call (request ids come from clients and may repeat): call token -> request id.
    in_flight: dict = field(default_factory=dict)
    edge: EdgeWork = field(default_factory=EdgeWork)  # per-request work too heavy for the event loop


class EngineCalls:
    """A call's `context` is a grpc.aio one or any other with `abort(code, message)`, which ends the call with that
    status (it raises), and `time_remaining()` (None: no deadline), as server/openai's HttpCall for HTTP."""

    def __init__(self, state: ServerState):
        self.state = state

    async def run(self, context, token_ids: list[int], params: SamplingParams, request_id: str, priority: int = 0,
                  **options) -> AsyncIterator[RequestOutput]:
        """The request's outputs to the finished one; every other ending aborts the call with its status."""
        engine = await self.engine(context, generation=True)
        if self.state.config.log_requests:
            log.info("request %s: %d prompt tokens, %s", request_id, len(token_ids), params)
        call = object()
        self.state.in_flight[call] = request_id
        settled = False  # the call ended with its answer or with an explicit status
        tally = RequestTally(self.state.metrics)
        try:
            # aclosing: however this call ends, the engine's request is aborted (its blocks freed) before the status
            async with contextlib.aclosing(engine.generate(token_ids, params, request_id, priority,
                                                           **options)) as outputs:
                async for output in outputs:
                    tally.observe(output)
                    if output.finished and output.finish_reason == "abort" and self.state.draining:
                        settled = True
                        await self._end(call, context, grpc.StatusCode.UNAVAILABLE,
                                        "server is shutting down; retry elsewhere")
                    yield output
            settled = True
            tally.completed()
        except (QueueFullError, EngineDeadError, RequestFailedError, ValueError) as exc:
            settled = True
            await self._end(call, context, *self._status_for(exc, request_id))
        except StreamWriteTimeout as exc:  # thrown in by stream()
            settled = True
            del self.state.in_flight[call]
            self.count_failure(grpc.StatusCode.DEADLINE_EXCEEDED.name)
            log.warning("request %s: %s", request_id, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)), STATUS_WAIT_S)
        except Exception as exc:  # noqa: BLE001 - a fault of ours, here or thrown in by stream(): counted, INTERNAL
            if settled:  # the call's own status (a drain's), raised by context.abort
                raise
            settled = True
            log.error("request %s failed: %r", request_id, exc)
            await self._end(call, context, grpc.StatusCode.INTERNAL, f"internal error (request {request_id})")
        finally:
            self.state.in_flight.pop(call, None)
            if not settled:  # cancelled by the client or its deadline, while waiting or while sending
                remaining = context.time_remaining()
                # The client's own timer usually fires a hair before ours: its cancel is the deadline.
                expired = remaining is not None and remaining <= DEADLINE_SLACK_S
                self.count_failure("DEADLINE_EXCEEDED" if expired else "CANCELLED")

    async def stream(self, context, token_ids: list[int], params: SamplingParams, request_id: str,
                     to_messages: Callable[[RequestOutput], Iterable], priority: int = 0, **options) -> None:
        """run() for a server-streaming call: each output's messages written as the client takes them. A write
        the client leaves unread for --stream-write-timeout seconds ends the call DEADLINE_EXCEEDED: the request
        is aborted in the engine (its blocks freed) and leaves the in-flight count at once."""
        deadline = WriteDeadline(self.state.config.stream_write_timeout)
        outputs = self.run(context, token_ids, params, request_id, priority, **options)
        try:
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    try:
                        for message in to_messages(output):
                            await deadline.write(context, message)
                    except Exception as exc:  # noqa: BLE001 - run() ends the call with its status and counts it
                        thrown = exc if isinstance(exc, StreamWriteTimeout) else RuntimeError(repr(exc))  # INTERNAL
                        with contextlib.suppress(StopAsyncIteration):
                            await outputs.athrow(thrown)
                        return
        finally:
            deadline.close()

    async def _end(self, call, context, code: grpc.StatusCode, message: str):
        """End the call with a status, uncounting it first: a client that has its status never finds it in flight."""
        del self.state.in_flight[call]
        await self.fail(context, code, message)

    @staticmethod
    def _status_for(exc: Exception, request_id: str) -> tuple[grpc.StatusCode, str]:
        if isinstance(exc, QueueFullError):
            return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        if isinstance(exc, EngineDeadError):
            log.error("request %s failed: %s", request_id, exc)
            return grpc.StatusCode.INTERNAL, f"engine failure (request {request_id})"
        if isinstance(exc, RequestFailedError):  # logged by the engine, with its cause
            return grpc.StatusCode.INTERNAL, f"request {request_id} failed in the engine; other requests go on"
        return grpc.StatusCode.INVALID_ARGUMENT, str(field_error(exc))

    def ready(self) -> tuple[bool, str]:
        """Whether new work can be served here now, and if not, why (readiness's rule)."""
        engine = self.state.engine
        if self.state.draining:
            return False, "server is shutting down; retry elsewhere"
        if engine is None:
            return False, "model is still loading"
        if not engine.alive:
            return False, "engine has failed; the server is restarting"
        if engine.stalled_for() >= self.state.config.stall_timeout:
            return False, f"engine made no progress for {self.state.config.stall_timeout:.0f} s with work pending"
        return True, "ready"

    async def engine(self, context, generation: bool = False) -> AsyncEngine:
        """The engine, or the call ends UNAVAILABLE (counted as a failed request for a generation call)."""
        engine = self.state.engine
        end = (lambda code, message: self.fail(context, code, message)) if generation else context.abort
        if self.state.draining:
            await end(grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry elsewhere")
        if engine is None:
            await end(grpc.StatusCode.UNAVAILABLE, "model is still loading")
        if not engine.alive:
            await end(grpc.StatusCode.UNAVAILABLE, "engine has failed; the server is restarting")
        return engine

    async def fail(self, context, code: grpc.StatusCode, message: str):
        """End a generation call with a status, counted."""
        self.count_failure(code.name)
        await context.abort(code, message)

    def count_failure(self, code: str) -> None:
        if self.state.metrics is not None:
            self.state.metrics.record_failure(code)
