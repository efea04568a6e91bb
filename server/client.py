"""Python clients for the beastserve daemon: `Client` (blocking) and `AsyncClient` (asyncio), both thin
wrappers over the generated gRPC stubs. `build_request` maps keyword arguments onto a GenerateRequest and
checks them as the daemon would, naming the field; answers come back as `Response` (finish reasons as words)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scheduler.core.params import SamplingParams
from scheduler.core.structured import StructuredOutputsParams
from server.convert import check_request, field_error, finish_reason_name
from server.defaults import DEFAULT_ADDRESS, READINESS_SERVICE  # noqa: F401 (READINESS_SERVICE: for users)
from server.proto.beastserve.v1 import generate_pb2 as pb
from server.proto.beastserve.v1 import generate_pb2_grpc

DEFAULT_MAX_MESSAGE_BYTES = 16 << 20  # the daemon's default --max-message-bytes

# Every field of the request's sections, by name, so a keyword lands wherever the proto puts it.
_SECTIONS = ("sampling", "stopping", "output", "speculative")
_FIELDS = {field.name: (section, field)
           for section in _SECTIONS
           for field in pb.GenerateRequest.DESCRIPTOR.fields_by_name[section].message_type.fields}
# SpeculativeOptions.enabled reads better as `speculative=True`.
_FIELDS["speculative"] = _FIELDS.pop("enabled")
# A field of the request itself, not of a section.
_FIELDS["truncate_prompt_tokens"] = (None, pb.GenerateRequest.DESCRIPTOR.fields_by_name["truncate_prompt_tokens"])
_SAMPLING_PARAMS = {f.name for f in dataclasses.fields(SamplingParams)}


def build_request(prompt: str | Sequence[int] | None = None, *, chat: list[dict] | None = None,
                  request_id: str | None = None, max_tokens: int | None = None, temperature: float | None = None,
                  top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
                  seed: int | None = None, stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
                  ignore_eos: bool = False, min_tokens: int = 0, logprobs: int = 0, priority: int = 0,
                  structured_outputs: StructuredOutputsParams | dict | None = None, **more) -> pb.GenerateRequest:
    """A GenerateRequest holding only what was given; the server's defaults fill the rest.

    `prompt` is text or token ids; `chat` is a list of {"role", "content"} messages (give one of the two).
    `more` takes any other field of SamplingParams, StoppingCriteria, OutputOptions or SpeculativeOptions
    by its proto name (`repetition_penalty`, `logit_bias` as a {token_id: bias} dict, `prompt_logprobs`,
    `skip_special_tokens`, `max_draft_tokens`, ...), with `speculative` for SpeculativeOptions.enabled, and
    `truncate_prompt_tokens`. `structured_outputs` constrains the output: a StructuredOutputsParams or its
    fields as a dict, e.g. {"json": schema} or {"choice": ["yes", "no"]}.
    """
    if not (isinstance(priority, int) and -2**31 <= priority < 2**31):
        raise ValueError(f"priority: must be an integer in [-2**31, 2**31), got {priority!r}")
    request = pb.GenerateRequest(request_id=request_id or "", priority=priority)
    if (prompt is None) == (chat is None):
        raise ValueError("give either prompt or chat, not both" if chat is not None else "prompt or chat is required")
    if chat is not None:
        request.chat.CopyFrom(chat_proto(chat))
    elif isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    fields = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                  stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, min_tokens=min_tokens,
                  logprobs=logprobs, **more)
    unknown = next((name for name in fields if name not in _FIELDS), None)
    if unknown is not None:
        raise TypeError(f"build_request() got an unexpected keyword argument {unknown!r}")
    try:  # the engine's own rules first, so a bad value gets the message the daemon would give
        SamplingParams(**{k: v for k, v in fields.items() if k in _SAMPLING_PARAMS and v is not None})
    except ValueError as exc:
        raise field_error(exc) from None
    for name, value in fields.items():
        section, field = _FIELDS[name]
        # Leave unset what was not given: an optional field stays absent, so the server's default applies.
        if value is None or (not field.has_presence and value == field.default_value):
            continue
        target = getattr(request, section) if section is not None else request
        try:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                getattr(target, field.name).update(value)
            elif field.is_repeated:
                getattr(target, field.name).extend([value] if isinstance(value, str) else value)
            else:
                setattr(target, field.name, value)
        except (ValueError, TypeError) as exc:  # protobuf's own words ("Value out of range: -5") name no field
            where = f"{section}.{field.name}" if section is not None else field.name
            raise ValueError(f"{where}: {value!r} is not a valid value ({exc})") from None
    if structured_outputs is not None:
        request.structured_outputs.CopyFrom(structured_outputs_proto(structured_outputs))
    check_request(request)
    return request


def structured_outputs_proto(so: StructuredOutputsParams | dict) -> pb.StructuredOutputs:
    try:
        so = StructuredOutputsParams(**so) if isinstance(so, dict) else so
    except TypeError as exc:  # an unknown key
        raise ValueError(f"structured_outputs: {exc}") from None
    if not isinstance(so, StructuredOutputsParams):
        raise ValueError(f"structured_outputs: must be a StructuredOutputsParams or a dict, got {so!r}")
    kind = so.kind
    if kind == "choice":
        return pb.StructuredOutputs(choice=pb.Choices(choices=so.choice))
    return pb.StructuredOutputs(**{kind: getattr(so, kind)})


def chat_proto(messages: list[dict]) -> pb.Chat:
    return pb.Chat(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages])


def tokenize_request(text: str | None, chat: list[dict] | None, add_special_tokens: bool) -> pb.TokenizeRequest:
    if (text is None) == (chat is None):
        raise ValueError("give either text or chat, not both" if chat is not None else "text or chat is required")
    if chat is not None:
        return pb.TokenizeRequest(chat=chat_proto(chat), add_special_tokens=add_special_tokens)
    return pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)


def channel_credentials(tls_ca_file: str | None = None, tls_cert_file: str | None = None,
                        tls_key_file: str | None = None) -> grpc.ChannelCredentials | None:
    """TLS credentials when any TLS file is given (no CA file: the system roots), else None for plaintext."""
    if bool(tls_cert_file) != bool(tls_key_file):
        raise ValueError("tls_cert_file and tls_key_file go together (mutual TLS)")
    if not (tls_ca_file or tls_cert_file):
        return None
    return grpc.ssl_channel_credentials(root_certificates=_read(tls_ca_file), private_key=_read(tls_key_file),
                                        certificate_chain=_read(tls_cert_file))


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def health_status_name(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class Response:
    """A GenerateResponse with `finish_reason` as a word: "stop", "length" or "abort" (None while streaming).
    Every other field reads as on the message itself, which is `.proto`."""

    __slots__ = ("proto",)

    def __init__(self, proto: pb.GenerateResponse):
        self.proto = proto

    @property
    def finish_reason(self) -> str | None:
        return finish_reason_name(self.proto.finish_reason)

    @property
    def choices(self) -> list[Response]:
        """With n > 1 (unary): each completion, in index order; else the answer itself."""
        return [Response(c) for c in self.proto.choices] or [self]

    def __getattr__(self, name: str):
        return getattr(self.proto, name)

    def __repr__(self) -> str:
        return f"Response(finish_reason={self.finish_reason!r}, {self.proto!r})"


class _Stream:
    """A streaming call whose messages arrive as `Response`; `.cancel()`, `.code()` etc. are the call's."""

    def __init__(self, call):
        self._call = call

    def __iter__(self) -> Iterator[Response]:
        return (Response(message) for message in self._call)

    async def _responses(self) -> AsyncIterator[Response]:
        async for message in self._call:
            yield Response(message)

    def __aiter__(self) -> AsyncIterator[Response]:
        return self._responses()

    def __getattr__(self, name: str):
        return getattr(self._call, name)


class _ClientBase:
    """Channel, stubs and per-call options; subclasses differ only in blocking vs awaiting each call."""

    _grpc = grpc  # the module whose insecure_channel / secure_channel open the channel

    def __init__(self, address: str = DEFAULT_ADDRESS, *, api_key: str | None = None, tls_ca_file: str | None = None,
                 tls_cert_file: str | None = None, tls_key_file: str | None = None, timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        credentials = channel_credentials(tls_ca_file, tls_cert_file, tls_key_file)
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        if credentials is None:
            self._channel = self._grpc.insecure_channel(address, options=options)
        else:
            self._channel = self._grpc.secure_channel(address, credentials, options=options)
        self._generation = generate_pb2_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self._timeout = timeout

    def _options(self, timeout: float | None) -> dict:
        return {"timeout": self._timeout if timeout is None else timeout, "metadata": self._metadata}


class Client(_ClientBase):
    """Blocking client. Generation keywords are those of `build_request`; `timeout` (seconds) overrides
    the client's default deadline for one call. Failed calls raise grpc.RpcError."""

    def generate(self, prompt: str | Sequence[int] | None = None, *, timeout: float | None = None,
                 **params) -> Response:
        return Response(self._generation.Generate(build_request(prompt, **params), **self._options(timeout)))

    def stream(self, prompt: str | Sequence[int] | None = None, *, timeout: float | None = None,
               **params) -> _Stream:
        """Deltas as they arrive; the last carries finish_reason, usage and timing. `.cancel()` ends it early."""
        return _Stream(self._generation.GenerateStream(build_request(prompt, **params), **self._options(timeout)))

    def chat(self, messages: list[dict], **params) -> Response:
        return self.generate(chat=messages, **params)

    def tokenize(self, text: str | None = None, *, chat: list[dict] | None = None, add_special_tokens: bool = True,
                 timeout: float | None = None) -> list[int]:
        request = tokenize_request(text, chat, add_special_tokens)
        return list(self._generation.Tokenize(request, **self._options(timeout)).token_ids)

    def model_info(self, *, timeout: float | None = None) -> pb.ModelInfo:
        return self._generation.GetModelInfo(pb.GetModelInfoRequest(), **self._options(timeout))

    def load(self, *, timeout: float | None = None) -> pb.Load:
        return self._generation.GetLoad(pb.GetLoadRequest(), **self._options(timeout))

    def abort(self, request_ids: list[str], *, timeout: float | None = None) -> list[str]:
        """Ends the given requests; returns those that were still live."""
        response = self._generation.Abort(pb.AbortRequest(request_ids=request_ids), **self._options(timeout))
        return list(response.aborted_ids)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The status name (SERVING, NOT_SERVING, ...); service "" is liveness, READINESS_SERVICE readiness."""
        request = health_pb2.HealthCheckRequest(service=service)
        return health_status_name(self._health.Check(request, **self._options(timeout)))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """asyncio client with the methods of `Client`, awaited; `stream` returns an async iterator."""

    _grpc = grpc.aio

    async def generate(self, prompt: str | Sequence[int] | None = None, *, timeout: float | None = None,
                       **params) -> Response:
        return Response(await self._generation.Generate(build_request(prompt, **params), **self._options(timeout)))

    def stream(self, prompt: str | Sequence[int] | None = None, *, timeout: float | None = None,
               **params) -> _Stream:
        """Use as `async for response in client.stream(...)`; `.cancel()` ends it early."""
        return _Stream(self._generation.GenerateStream(build_request(prompt, **params), **self._options(timeout)))

    async def chat(self, messages: list[dict], **params) -> Response:
        return await self.generate(chat=messages, **params)

    async def tokenize(self, text: str | None = None, *, chat: list[dict] | None = None,
                       add_special_tokens: bool = True, timeout: float | None = None) -> list[int]:
        request = tokenize_request(text, chat, add_special_tokens)
        return list((await self._generation.Tokenize(request, **self._options(timeout))).token_ids)

    async def model_info(self, *, timeout: float | None = None) -> pb.ModelInfo:
        return await self._generation.GetModelInfo(pb.GetModelInfoRequest(), **self._options(timeout))

    async def load(self, *, timeout: float | None = None) -> pb.Load:
        return await self._generation.GetLoad(pb.GetLoadRequest(), **self._options(timeout))

    async def abort(self, request_ids: list[str], *, timeout: float | None = None) -> list[str]:
        response = await self._generation.Abort(pb.AbortRequest(request_ids=request_ids), **self._options(timeout))
        return list(response.aborted_ids)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_status_name(await self._health.Check(request, **self._options(timeout)))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
