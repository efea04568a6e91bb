"""The HTTP API as a FastAPI app, served by uvicorn as a task on the daemon's own event loop, with the gRPC port's
API keys and TLS."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from server.calls import ServerState
from server.config import ServerConfig
from server.openai.errors import HttpStatusError, error_response, invalid_request, on_status_error
from server.openai.routes import OpenAICalls
from server.security import bearer_allowed, load_api_keys

log = logging.getLogger(__name__)
OPEN_PATHS = ("/health",)  # probes call it without credentials, as gRPC's health service
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")  # what the request metrics count
SHUTDOWN_GRACE_S = 2  # after the drain: connections still open are idle keep-alives


def build_app(state: ServerState) -> FastAPI:
    calls = OpenAICalls(state)
    app = FastAPI(title="beastserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(calls.router())
    app.add_exception_handler(HttpStatusError, on_status_error)
    app.add_exception_handler(RequestValidationError, lambda request, exc: invalid_request(
        exc, calls.count_failure if request.url.path in GENERATION_PATHS else None))
    app.add_exception_handler(HTTPException, _http_exception)
    config = state.config
    keys = load_api_keys(config.api_key_file) if config.api_key_file else None
    return Guard(app, keys, config.max_message_bytes)


async def _http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own statuses (no such path, wrong method) in OpenAI's error shape."""
    return JSONResponse({"error": {"message": f"{request.method} {request.url.path}: {exc.detail}",
                                   "type": "invalid_request_error", "param": None,
                                   "code": str(exc.detail).lower().replace(" ", "_")}}, status_code=exc.status_code)


class Guard:
    """Before the app: the API key (401 in OpenAI's shape) and the body's size (gRPC's --max-message-bytes)."""

    def __init__(self, app, keys: list[bytes] | None, max_body_bytes: int):
        self.app, self.keys, self.max_body_bytes = app, keys, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            refusal = self._refusal(scope["path"], headers)
            if refusal is not None:
                response = error_response(refusal)
                if refusal.code == grpc.StatusCode.UNAUTHENTICATED:
                    response.headers["www-authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, path: str, headers: dict) -> HttpStatusError | None:
        if self.keys is not None and path not in OPEN_PATHS and not bearer_allowed(
                headers.get(b"authorization", b"").decode("latin-1"), self.keys):
            return HttpStatusError(grpc.StatusCode.UNAUTHENTICATED,
                                   "missing or invalid API key (authorization: Bearer)")
        if b"transfer-encoding" in headers:
            return HttpStatusError(grpc.StatusCode.INVALID_ARGUMENT, "send the body with a content-length")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body_bytes:
            return HttpStatusError(grpc.StatusCode.INVALID_ARGUMENT, f"the body is larger than "
                                   f"{self.max_body_bytes} bytes (--max-message-bytes)")
        return None


class _Server(uvicorn.Server):
    """uvicorn inside the daemon: the daemon owns the signals (drain on SIGTERM), not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """uvicorn on a socket bound before the model loads (a taken port ends the start at once), serving until the
    daemon has drained."""

    def __init__(self, state: ServerState):
        self.config: ServerConfig = state.config
        self.state = state
        self.socket: socket.socket | None = None
        self.task: asyncio.Task | None = None

    def bind(self) -> None:
        """Raises OSError when the port is taken or the host is not an address here."""
        host = self.config.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host.strip("[]"), self.config.http_port), family=family)

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls_cert_file else "http"
        return f"{scheme}://{self.config.host}:{self.config.http_port}/v1"

    def start(self) -> None:
        config = self.config
        tls = {}
        if config.tls_cert_file:
            tls = dict(ssl_certfile=config.tls_cert_file, ssl_keyfile=config.tls_key_file,
                       ssl_ca_certs=config.tls_client_ca_file,
                       ssl_cert_reqs=ssl.CERT_REQUIRED if config.tls_client_ca_file else ssl.CERT_NONE)
        server_config = uvicorn.Config(build_app(self.state), lifespan="off", log_config=None, access_log=False,
                                       ws="none", timeout_graceful_shutdown=SHUTDOWN_GRACE_S, **tls)
        self.server = _Server(server_config)
        self.task = asyncio.create_task(self.server.serve(sockets=[self.socket]))

    async def stop(self) -> None:
        if self.task is None:
            if self.socket is not None:
                self.socket.close()
            return
        self.server.should_exit = True
        await self.task
