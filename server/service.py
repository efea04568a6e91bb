"""The beastserve.v1.Generation service: validates at the edge, streams engine outputs back,
and ends every call with an explicit status."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from scheduler.io.outputs import RequestOutput
from server.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from server.config import ServerConfig, served_name
from server.convert import (
    InvalidArgument,
    chat_messages,
    field_error,
    speculative_options,
    to_engine_inputs,
    to_response,
)
from server.proto.beastserve.v1 import generate_pb2 as pb
from server.proto.beastserve.v1 import generate_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = "beastserve.v1.Generation"
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


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, state: ServerState):
        self.state = state

    async def Generate(self, request, context):
        request_id = _request_id(request, context)
        outputs = [o async for o in self._run(request, request_id, context)]
        return to_response(request_id, outputs)

    async def GenerateStream(self, request, context):
        request_id = _request_id(request, context)
        async for output in self._run(request, request_id, context):
            yield to_response(request_id, [output])

    async def Abort(self, request, context):
        engine = await self._engine(context)
        return pb.AbortResponse(aborted_ids=engine.abort(list(request.request_ids)))

    async def Tokenize(self, request, context):
        engine = await self._engine(context)
        inputs = engine.engine.inputs
        try:
            kind = request.WhichOneof("input")
            if kind == "text":
                ids = inputs.tokenize(request.text, add_special_tokens=request.add_special_tokens)
            elif kind == "chat":
                ids = inputs.render_chat(chat_messages(request.chat, "chat"))
            else:
                raise InvalidArgument("input: one of text or chat is required")
        except ValueError as exc:
            await self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, str(field_error(exc)))
        return pb.TokenizeResponse(token_ids=ids)

    async def GetModelInfo(self, request, context):
        engine = (await self._engine(context)).engine
        config = self.state.config
        return pb.ModelInfo(model=served_name(config), max_model_len=engine.max_model_len, vocab_size=engine.vocab_size,
                            eos_token_ids=engine.eos_token_ids, speculative_mode=config.engine.speculative,
                            draft_model=config.engine.draft_model or "")

    async def GetLoad(self, request, context):
        engine = (await self._engine(context)).engine
        pool = engine.pool
        return pb.Load(num_running=engine.num_running, num_waiting=engine.num_waiting,
                       kv_cache_usage=pool.num_used_blocks / pool.num_blocks, kv_blocks_free=pool.num_free_blocks,
                       kv_blocks_total=pool.num_blocks, max_queue_size=self.state.config.max_queue_size)

    async def _run(self, request, request_id: str, context) -> AsyncIterator[RequestOutput]:
        engine = await self._engine(context)
        try:
            token_ids, params = to_engine_inputs(request, engine.engine.inputs)
        except InvalidArgument as exc:
            await self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self.state.config.log_requests:
            log.info("request %s: %d prompt tokens, %s", request_id, len(token_ids), params)
        call = object()
        self.state.in_flight[call] = request_id
        settled = False  # the call ended with its answer or with an explicit status
        try:
            async for output in engine.generate(token_ids, params, request_id, request.priority,
                                                **speculative_options(request)):
                if output.finished and output.finish_reason == "abort" and self.state.draining:
                    settled = True
                    await self._fail(context, grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry elsewhere")
                yield output
            settled = True
        except (QueueFullError, EngineDeadError, ValueError) as exc:
            settled = True
            await self._fail(context, *self._status_for(exc, request_id))
        finally:
            del self.state.in_flight[call]
            if not settled:  # cancelled by the client or its deadline, while waiting or while sending
                remaining = context.time_remaining()
                # The client's own timer usually fires a hair before ours: its cancel is the deadline.
                expired = remaining is not None and remaining <= DEADLINE_SLACK_S
                self._count_failure("DEADLINE_EXCEEDED" if expired else "CANCELLED")

    @staticmethod
    def _status_for(exc: Exception, request_id: str) -> tuple[grpc.StatusCode, str]:
        if isinstance(exc, QueueFullError):
            return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        if isinstance(exc, EngineDeadError):
            log.error("request %s failed: %s", request_id, exc)
            return grpc.StatusCode.INTERNAL, f"engine failure (request {request_id})"
        return grpc.StatusCode.INVALID_ARGUMENT, str(field_error(exc))

    async def _engine(self, context) -> AsyncEngine:
        engine = self.state.engine
        if self.state.draining:
            await self._fail(context, grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry elsewhere")
        if engine is None:
            await self._fail(context, grpc.StatusCode.UNAVAILABLE, "model is still loading")
        if not engine.alive:
            await self._fail(context, grpc.StatusCode.UNAVAILABLE, "engine has failed; the server is restarting")
        return engine

    async def _fail(self, context, code: grpc.StatusCode, message: str):
        self._count_failure(code.name)
        await context.abort(code, message)

    def _count_failure(self, code: str) -> None:
        if self.state.metrics is not None:
            self.state.metrics.record_failure(code)


def _request_id(request, context) -> str:
    if request.request_id:
        return request.request_id
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and value:
            return value
    return uuid.uuid4().hex
