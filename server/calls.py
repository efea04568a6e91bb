"""What every generation service does with a call: find an engine that can take it, run one request on it to
its end or to an explicit status, and count how each call ended (once)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from scheduler import SamplingParams
from scheduler.io.outputs import RequestOutput
from server.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from server.config import ServerConfig
from server.convert import field_error
from server.edge import EdgeWork

log = logging.getLogger(__name__)
DEADLINE_SLACK_S = 0.1


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
        engine = await self.engine(context)
        if self.state.config.log_requests:
            log.info("request %s: %d prompt tokens, %s", request_id, len(token_ids), params)
        call = object()
        self.state.in_flight[call] = request_id
        settled = False  # the call ended with its answer or with an explicit status
        try:
            async for output in engine.generate(token_ids, params, request_id, priority, **options):
                if output.finished and output.finish_reason == "abort" and self.state.draining:
                    settled = True
                    await self._end(call, context, grpc.StatusCode.UNAVAILABLE,
                                    "server is shutting down; retry elsewhere")
                yield output
            settled = True
        except (QueueFullError, EngineDeadError, ValueError) as exc:
            settled = True
            await self._end(call, context, *self._status_for(exc, request_id))
        finally:
            self.state.in_flight.pop(call, None)
            if not settled:  # cancelled by the client or its deadline, while waiting or while sending
                remaining = context.time_remaining()
                # The client's own timer usually fires a hair before ours: its cancel is the deadline.
                expired = remaining is not None and remaining <= DEADLINE_SLACK_S
                self.count_failure("DEADLINE_EXCEEDED" if expired else "CANCELLED")

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

    async def engine(self, context) -> AsyncEngine:
        engine = self.state.engine
        if self.state.draining:
            await self.fail(context, grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry elsewhere")
        if engine is None:
            await self.fail(context, grpc.StatusCode.UNAVAILABLE, "model is still loading")
        if not engine.alive:
            await self.fail(context, grpc.StatusCode.UNAVAILABLE, "engine has failed; the server is restarting")
        return engine

    async def fail(self, context, code: grpc.StatusCode, message: str):
        self.count_failure(code.name)
        await context.abort(code, message)

    def count_failure(self, code: str) -> None:
        if self.state.metrics is not None:
            self.state.metrics.record_failure(code)
