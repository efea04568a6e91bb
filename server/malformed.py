"""Request messages that do not parse (garbage bytes, a truncated message, invalid UTF-8 in a string field) end
their call INVALID_ARGUMENT naming the field, counted (generation methods only, as every request metric) and
logged in one line.

grpc.aio parses a request before the method runs and turns a parse error into UNKNOWN and a traceback in the log.
Here each unary-request method's parser is wrapped so a parse error becomes a `Malformed` value, which the
method's wrapper refuses before the method sees it."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)
MAX_FIELDS_WALKED = 10_000  # a parse error's field is looked for this far, no further: the walk is plain Python
MAX_DEPTH = 32  # nor deeper (a recursive message type could nest as far as the bytes go)

Refuse = Callable[[object, grpc.StatusCode, str], Awaitable]  # (context, code, message): counts, then aborts


@dataclass
class Malformed:
    message: str


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """refusers: method path -> how it ends (and counts) a refused call; other methods abort, uncounted."""

    def __init__(self, refusers: dict[str, Refuse]):
        self.refusers = refusers

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        refuse = self.refusers.get(details.method, _abort)

        async def refuse_logged(request: Malformed, context) -> None:
            log.warning("%s refused: %s", details.method, request.message)
            await refuse(context, grpc.StatusCode.INVALID_ARGUMENT, request.message)

        parse = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None and inspect.iscoroutinefunction(handler.unary_unary):
            method = handler.unary_unary

            async def unary(request, context):
                if isinstance(request, Malformed):
                    await refuse_logged(request, context)
                return await method(request, context)

            return handler._replace(request_deserializer=parse, unary_unary=unary)
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            stream = handler.unary_stream

            async def unary_stream(request, context):
                if isinstance(request, Malformed):
                    await refuse_logged(request, context)
                async for response in stream(request, context):
                    yield response

            return handler._replace(request_deserializer=parse, unary_stream=unary_stream)
        if handler.unary_stream is not None and inspect.iscoroutinefunction(handler.unary_stream):
            writer = handler.unary_stream  # a streaming method that writes with context.write

            async def unary_stream_writer(request, context):
                if isinstance(request, Malformed):
                    await refuse_logged(request, context)
                return await writer(request, context)

            return handler._replace(request_deserializer=parse, unary_stream=unary_stream_writer)
        return handler


async def _abort(context, code: grpc.StatusCode, message: str) -> None:
    await context.abort(code, message)


def _tolerant(deserializer: Callable[[bytes], object]) -> Callable[[bytes], object]:
    """The deserializer, returning Malformed (the field at fault named where it can be found) for what does not
    parse."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)

    def parse(data: bytes):
        try:
            return deserializer(data)
        except DecodeError as exc:
            if descriptor is None:
                return Malformed(f"request: not a valid message ({exc})")
            field, why = find_bad_field(descriptor, data)
            return Malformed(f"{field or 'request'}: {why or 'does not parse'} (not a valid {descriptor.full_name})")

    return parse


def find_bad_field(descriptor: Descriptor, data: bytes, prefix: str = "",
                   budget: list[int] | None = None) -> tuple[str | None, str | None]:
    """Walk the wire format for the first field that breaks it: (its dotted path, why), or (None, None) when the
    walk finds nothing (or gives up after MAX_FIELDS_WALKED fields)."""
    budget = budget if budget is not None else [MAX_FIELDS_WALKED]
    if prefix.count(".") > MAX_DEPTH:
        return prefix.rstrip("."), f"nested more than {MAX_DEPTH} messages deep"
    pos = 0
    while pos < len(data):
        budget[0] -= 1
        if budget[0] < 0:
            return None, None
        key, pos = _varint(data, pos)
        if key is None:
            return prefix.rstrip(".") or None, "truncated or corrupt"
        field = descriptor.fields_by_number.get(key >> 3)
        path = prefix + field.name if field is not None else prefix.rstrip(".") or None
        wire = key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            if value is None:
                return path, "truncated or corrupt"
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            size, pos = _varint(data, pos)
            if size is None or pos + size > len(data):
                return path, "truncated or corrupt"
            chunk, pos = data[pos:pos + size], pos + size
            bad = _bad_chunk(field, chunk, path, budget)
            if bad != (None, None):
                return bad
        else:
            return path, "corrupt (a wire type proto3 does not use)"
        if pos > len(data):
            return path, "truncated or corrupt"
    return None, None


def _bad_chunk(field: FieldDescriptor | None, chunk: bytes, path: str, budget: list[int]):
    if field is None:
        return None, None
    if field.type == FieldDescriptor.TYPE_STRING:
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError:
            return path, "invalid UTF-8 in a string field"
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        return find_bad_field(field.message_type, chunk, path + ".", budget)
    return None, None


def _varint(data: bytes, pos: int) -> tuple[int | None, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None, pos
