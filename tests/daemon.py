"""Start a real daemon in a subprocess on free loopback ports, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
READINESS = "beastserve.v1.Generation"


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports: each socket stays bound until all are chosen, so the kernel cannot hand the
    same port out twice (a daemon given one port for two listeners fails to start)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def sigint_by_default() -> None:
    """preexec_fn for a child the test stops with SIGINT (Ctrl-C): a shell that starts a job in the background
    hands it SIGINT ignored, and a process (or bash script) that starts with SIGINT ignored never sees it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class LoggedProcess:
    """A subprocess with its output in a log file; stopped with SIGTERM on close()."""

    def __init__(self, cmd: list[str], log_path: Path, **popen):
        self.log_path = log_path
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, **popen)

    def log(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def close(self, timeout: float = 60) -> int:
        self.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        finally:
            self.log_file.close()


class Daemon(LoggedProcess):
    """`beastserve serve` with the given flags; stopped with SIGTERM on close()."""

    def __init__(self, model: str, *flags: str, log_path: Path, channel_credentials=None, env=None):
        self.port, self.metrics_port, self.http_port = free_ports(3)
        self.address = f"127.0.0.1:{self.port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"  # the OpenAI API's root (/v1/..., /health)
        cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(self.port), "--metrics-port", str(self.metrics_port), "--http-port", str(self.http_port),
               *flags]
        super().__init__(cmd, log_path, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        self.channel_credentials = channel_credentials

    def channel(self, **options) -> grpc.Channel:
        if self.channel_credentials is not None:
            return grpc.secure_channel(self.address, self.channel_credentials, **options)
        return grpc.insecure_channel(self.address, **options)

    def health(self, service: str = READINESS) -> str:
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
            return health_pb2.HealthCheckResponse.ServingStatus.Name(status)

    def wait_ready(self, timeout: float = 120) -> Daemon:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.health() == "SERVING":
                    return self
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"daemon not ready after {timeout} s:\n{self.log()}")


def serve_for_module(model, tmp_path_factory, *flags: str):
    """For module fixtures: yield a ready daemon; at teardown it must drain and exit 0."""
    daemon = Daemon(model, *flags, log_path=tmp_path_factory.mktemp("log") / "daemon.log")
    yield daemon.wait_ready()
    assert daemon.close() == 0


def generation_stub(daemon: Daemon):
    """For module fixtures: a Generation stub on its own channel."""
    from server.proto.beastserve.v1 import generate_pb2_grpc

    with daemon.channel() as channel:
        yield generate_pb2_grpc.GenerationStub(channel)
