"""API keys (authorization: Bearer <key>) and TLS / mutual TLS, for the gRPC port and the HTTP API."""

from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path

import grpc

# Probes and discovery stay open: orchestrators call them without credentials.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def exposure_warning(host: str, tls: bool, api_keys: bool, metrics_port: int = 0) -> str | None:
    """What to warn about when anyone who reaches `host` can use the daemon, unseen and unasked. The metrics
    listen on the same host, in plaintext and unauthenticated whatever the gRPC port's settings."""
    if is_loopback(host):
        return None
    metrics = f"; /metrics on port {metrics_port} is open to them too (it listens on --host)" if metrics_port else ""
    if tls or api_keys:
        return (f"metrics listen on {host}:{metrics_port}, beyond this machine, in plaintext and without API keys; "
                "use --host 127.0.0.1 or --metrics-port 0 to keep them here") if metrics_port else None
    return (f"listening on {host}, beyond this machine, with neither TLS nor API keys: anyone who reaches the port "
            f"can generate and read what is sent in plaintext{metrics}; set --tls-cert-file/--tls-key-file and "
            "--api-key-file, or --host 127.0.0.1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def load_api_keys(path: str) -> list[bytes]:
    keys = [line.strip() for line in Path(path).read_text().splitlines()]
    keys = [k.encode() for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ValueError(f"--api-key-file {path} holds no key")
    return keys


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: list[bytes]):
        self.keys = keys

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES) or self._allowed(details):
            return handler
        return _denying(handler)

    def _allowed(self, details) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                return bearer_allowed(value, self.keys)
        return False


def bearer_allowed(authorization: str, keys: list[bytes]) -> bool:
    """Whether an `authorization` value (`Bearer <key>`) holds one of the keys."""
    if not authorization.startswith("Bearer "):
        return False
    given = authorization[len("Bearer "):].encode()
    # Compare against every key in constant time, so timing reveals nothing.
    return any([hmac.compare_digest(given, k) for k in keys])


def _denying(handler):
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key (authorization: Bearer)")

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key (authorization: Bearer)")
        yield  # pragma: no cover - makes this an async generator like the real handler

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
    raise AssertionError("the API has only unary and server-streaming methods")


def server_credentials(cert_file: str, key_file: str, client_ca_file: str | None) -> grpc.ServerCredentials:
    pair = (Path(key_file).read_bytes(), Path(cert_file).read_bytes())
    client_ca = Path(client_ca_file).read_bytes() if client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)
