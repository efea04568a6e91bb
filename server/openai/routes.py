"""The HTTP API's endpoints, over the same engine calls as the gRPC services: /v1/completions,
/v1/chat/completions, /v1/models, /tokenize, /detokenize, /tokenizer_info and /health."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.calls import EngineCalls
from server.config import served_name
from server.convert import InvalidArgument, render_chat, tokenize_text
from server.openai.convert import chat_messages, prepare_chat, prepare_completion
from server.openai.errors import HttpCall, HttpStatusError
from server.openai.generation import Generation
from server.openai.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

CLIENT_CLOSED = 499  # nobody reads it: the client has gone


class OpenAICalls(EngineCalls):
    """The endpoints; calls end with a status through HttpCall, counted as the gRPC services count theirs."""

    def router(self) -> APIRouter:
        router = APIRouter()
        router.add_api_route("/v1/completions", self.completions, methods=["POST"])
        router.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        router.add_api_route("/v1/models", self.models, methods=["GET"])
        router.add_api_route("/tokenize", self.tokenize, methods=["POST"])
        router.add_api_route("/detokenize", self.detokenize, methods=["POST"])
        router.add_api_route("/tokenizer_info", self.tokenizer_info, methods=["GET"])
        router.add_api_route("/health", self.health, methods=["GET"])
        return router

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await until_disconnected(request, self._generate(body, chat=False))

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        return await until_disconnected(request, self._generate(body, chat=True))

    async def _generate(self, body, chat: bool) -> Response:
        call = HttpCall()
        engine = await self.engine(call, generation=True)
        await self._check_model(call, body.model)
        prepare = prepare_chat if chat else prepare_completion
        try:
            prepared = await prepare(body, engine.engine, self.state.edge)
        except InvalidArgument as exc:
            await self.fail(call, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        generation = Generation(self, call, prepared, chat=chat, model=served_name(self.state.config),
                                tokenizer=engine.engine.tokenizer, as_ids=bool(body.return_tokens_as_token_ids),
                                request_id=body.request_id)
        if not body.stream:
            return JSONResponse(await generation.whole())
        outputs = generation.outputs()
        try:
            first = await anext(outputs)  # a request refused before its first token gets its status as such
        except BaseException:
            await outputs.aclose()
            raise
        return StreamingResponse(generation.events(_chain(first, outputs), body.stream_options),
                                 media_type="text/event-stream")

    async def models(self) -> dict:
        engine = self._serving()
        return {"object": "list", "data": [{"id": served_name(self.state.config), "object": "model",
                                            "created": int(time.time()), "owned_by": "beastserve",
                                            "max_model_len": engine.max_model_len}]}

    async def tokenize(self, body: TokenizeRequest) -> dict:
        """vLLM's /tokenize: `prompt` (text) or `messages` (a chat, with the template)."""
        engine = self._serving(body.model)
        inputs = engine.inputs
        try:
            if (body.prompt is None) == (body.messages is None):
                raise InvalidArgument("prompt: give prompt or messages, not both or neither")
            if body.prompt is not None:
                ids = await tokenize_text(body.prompt, "prompt", inputs, self.state.edge,
                                          body.add_special_tokens is not False)
            else:
                if body.add_generation_prompt is False:
                    raise InvalidArgument("add_generation_prompt: a chat is rendered with the assistant's turn opened")
                ids = await render_chat(chat_messages(body.messages), "messages", inputs, self.state.edge)
        except ValueError as exc:
            message = str(exc)
            raise_as = message if message.startswith(("prompt", "messages", "add_generation")) else f"prompt: {message}"
            raise HttpStatusError(grpc.StatusCode.INVALID_ARGUMENT, raise_as) from None
        out = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = engine.tokenizer.convert_ids_to_tokens(ids)
        return out

    async def detokenize(self, body: DetokenizeRequest) -> dict:
        engine = self._serving(body.model)
        bad = next((t for t in body.tokens if not 0 <= t < engine.vocab_size), None)
        if bad is not None:
            raise HttpStatusError(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"tokens: token id {bad} is outside the vocabulary [0, {engine.vocab_size})")
        if engine.tokenizer is None:
            raise HttpStatusError(grpc.StatusCode.INVALID_ARGUMENT, "tokens: this model has no tokenizer")
        return {"prompt": await self.state.edge.call(len(body.tokens), engine.tokenizer.decode, body.tokens)}

    async def tokenizer_info(self) -> dict:
        """What a client needs to tokenize as the server does without the model's files (lm-eval's remote
        tokenizer reads it): the special tokens and the chat template."""
        engine = self._serving()
        tokenizer = engine.tokenizer
        if tokenizer is None:
            raise HttpStatusError(grpc.StatusCode.NOT_FOUND, "this model has no tokenizer")
        return {"tokenizer_class": type(tokenizer).__name__, "eos_token": tokenizer.eos_token,
                "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token,
                "chat_template": tokenizer.chat_template, "model_max_length": engine.max_model_len}

    async def health(self) -> Response:
        """Readiness, as the gRPC health service's: 200 when new work is served, else 503 saying why."""
        ready, why = self.ready()
        if ready:
            return Response(status_code=200)
        return JSONResponse({"error": {"message": why, "type": "server_error", "param": None,
                                       "code": "service_unavailable"}}, status_code=503)

    def _serving(self, model: str | None = None):
        """The engine, for calls that are not generation requests (not counted in the request metrics)."""
        ready, why = self.ready()
        if not ready:
            raise HttpStatusError(grpc.StatusCode.UNAVAILABLE, why)
        name = served_name(self.state.config)
        if model is not None and model != name:
            raise HttpStatusError(grpc.StatusCode.NOT_FOUND, _unknown_model(model, name))
        return self.state.engine.engine

    async def _check_model(self, call: HttpCall, model: str | None) -> None:
        name = served_name(self.state.config)
        if model is not None and model != name:
            await self.fail(call, grpc.StatusCode.NOT_FOUND, _unknown_model(model, name))


def _unknown_model(model: str, name: str) -> str:
    return f"model: the model `{model}` is not served here; this server serves `{name}`"


async def until_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """The response, unless the client goes first: then the work is cancelled (its engine requests aborted, their
    KV blocks freed at the next step). A streamed answer's own disconnect watch takes over once it starts."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        return Response(status_code=CLIENT_CLOSED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _chain(first, rest: AsyncIterator) -> AsyncIterator:
    yield first
    try:
        async for item in rest:
            yield item
    finally:
        await rest.aclose()
