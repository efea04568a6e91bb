"""The beastserve.v1.Generation service: validates at the edge, streams engine outputs back,
and ends every call with an explicit status."""

from __future__ import annotations

import uuid

import grpc

from scheduler import SamplingParams
from scheduler.speculative.registry import method_of
from server.calls import EngineCalls
from server.config import served_name
from server.convert import (
    InvalidArgument,
    chat_messages,
    field_error,
    render_chat,
    speculative_options,
    to_engine_inputs,
    to_response,
    to_unary_response,
    tokenize_text,
)
from server.proto.beastserve.v1 import generate_pb2 as pb
from server.proto.beastserve.v1 import generate_pb2_grpc as pb_grpc

SERVICE_NAME = "beastserve.v1.Generation"


class GenerationService(EngineCalls, pb_grpc.GenerationServicer):
    async def Generate(self, request, context):
        request_id = _request_id(request, context)
        token_ids, params = await self._inputs(request, context)
        outputs = [o async for o in self.run(context, token_ids, params, request_id, request.priority,
                                             **speculative_options(request))]
        return to_unary_response(request_id, outputs, request.sampling.n or 1)

    async def GenerateStream(self, request, context):
        request_id = _request_id(request, context)
        token_ids, params = await self._inputs(request, context)
        await self.stream(context, token_ids, params, request_id, lambda output: [to_response(request_id, [output])],
                          request.priority, **speculative_options(request))

    async def Abort(self, request, context):
        engine = await self.engine(context)
        return pb.AbortResponse(aborted_ids=engine.abort(list(request.request_ids)))

    async def Tokenize(self, request, context):
        engine = await self.engine(context)
        inputs, edge = engine.engine.inputs, self.state.edge
        try:
            kind = request.WhichOneof("input")
            if kind == "text":
                ids = await tokenize_text(request.text, "text", inputs, edge, request.add_special_tokens)
            elif kind == "chat":
                ids = await render_chat(chat_messages(request.chat, "chat"), "chat", inputs, edge)
            else:
                raise InvalidArgument("input: one of text or chat is required")
        except ValueError as exc:  # not a generation request: not counted
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(field_error(exc)))
        return pb.TokenizeResponse(token_ids=ids)

    async def GetModelInfo(self, request, context):
        engine = (await self.engine(context)).engine
        config = self.state.config
        method = _speculative_method(engine)
        return pb.ModelInfo(model=served_name(config), max_model_len=engine.max_model_len, vocab_size=engine.vocab_size,
                            eos_token_ids=engine.eos_token_ids, speculative_mode=method,
                            draft_model=config.engine.draft_model or "")

    async def GetLoad(self, request, context):
        engine = (await self.engine(context)).engine
        pool = engine.pool
        return pb.Load(num_running=engine.num_running, num_waiting=engine.num_waiting,
                       kv_cache_usage=pool.num_used_blocks / pool.num_blocks, kv_blocks_free=pool.num_free_blocks,
                       kv_blocks_total=pool.num_blocks, max_queue_size=self.state.config.max_queue_size)

    async def _inputs(self, request, context) -> tuple[list[int], SamplingParams]:
        engine = await self.engine(context, generation=True)
        try:
            return await to_engine_inputs(request, engine.engine, self.state.edge)
        except InvalidArgument as exc:
            await self.fail(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))


def _speculative_method(engine) -> str:
    """What speculative decoding runs ("best": what it chose), "off" without; an engine core in a process of its
    own says so itself."""
    if hasattr(engine, "speculative_method"):
        return engine.speculative_method
    return method_of(engine.speculator.proposer) if engine.speculator else "off"


def _request_id(request, context) -> str:
    if request.request_id:
        return request.request_id
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and value:
            return value
    return uuid.uuid4().hex
