"""Ending an HTTP call with a status: the services' status codes (gRPC's names, which the metrics count by) as HTTP
statuses, and OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`, naming the field at fault."""

from __future__ import annotations

import re

import grpc
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from server.openai.protocol import ChatCompletionRequest, CompletionRequest

# status code -> (HTTP status, OpenAI error type, OpenAI error code)
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
    grpc.StatusCode.INTERNAL: (500, "server_error", "internal_error"),
}
# A message that starts with a field path and a colon ("messages[0].role: ...") names it, and so does one that starts
# with a request field's name ("temperature must be ...", as SamplingParams says it).
_PATH = re.compile(r"^([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+(?:\[\d+\])?)*):\s")
_NAMES = (set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)) - {"model"}


class HttpStatusError(Exception):
    """Ends an HTTP call with this status; raised by HttpCall.abort, answered by the app's handler."""

    def __init__(self, code: grpc.StatusCode, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message = code, message
        self.param = param if param is not None else field_of(message)

    def body(self) -> dict:
        _, kind, code = _HTTP.get(self.code, _HTTP[grpc.StatusCode.INTERNAL])
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": code}}

    @property
    def http_status(self) -> int:
        return _HTTP.get(self.code, _HTTP[grpc.StatusCode.INTERNAL])[0]


def field_of(message: str) -> str | None:
    match = _PATH.match(message)
    if match:
        return match.group(1)
    first = message.split(" ", 1)[0]
    return first if first in _NAMES else None


class HttpCall:
    """What EngineCalls needs of a call's context, for an HTTP request: ending it with a status raises
    HttpStatusError, which the app answers as OpenAI's error body. HTTP requests carry no deadline."""

    async def abort(self, code: grpc.StatusCode, message: str):
        raise HttpStatusError(code, message)

    def time_remaining(self) -> None:
        return None


def error_response(exc: HttpStatusError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.http_status)


async def on_status_error(request: Request, exc: HttpStatusError) -> JSONResponse:
    return error_response(exc)


def validation_message(error: dict) -> tuple[str, str]:
    """(field path, message) of one of pydantic's errors, in the request's terms: `messages[0].content`."""
    loc = [part for part in error["loc"] if part != "body"]
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _is_type_tag(str(part)):
            path += f".{part}" if path else str(part)
    if error["type"] == "extra_forbidden":
        return path, f"{path}: unrecognized request field (not served here, so refused rather than ignored)"
    return path, f"{path}: {error['msg']}" if path else error["msg"]


def _is_type_tag(part: str) -> bool:
    """pydantic's names for the member of a union it tried (`str`, `list[int]`, `function-after[...]`)."""
    return part in ("str", "int", "float", "bool", "dict", "list", "none") or "[" in part or part.startswith(
        ("function-", "tagged-union", "json-or-python"))


def invalid_request(exc: RequestValidationError, count_failure=None) -> JSONResponse:
    """A body that does not parse or fit the request's schema: 400 naming the first field at fault; counted as a
    failed request when count_failure is given (generation requests)."""
    errors = exc.errors()
    if not errors:
        path, message = None, "the request body is not a valid request"
    else:
        # Of a union's members' errors, the one that got furthest says most (a content part's `type`, not
        # "not a string").
        path, message = validation_message(max(errors, key=lambda e: len(e["loc"])))
    if count_failure is not None:
        count_failure("INVALID_ARGUMENT")
    return error_response(HttpStatusError(grpc.StatusCode.INVALID_ARGUMENT, message, path or None))
