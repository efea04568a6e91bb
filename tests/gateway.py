"""Start the smg gateway in a subprocess on free loopback ports, in front of running daemons, for end-to-end tests
of the OpenAI API it serves over the daemons' vllm.grpc.engine.VllmEngine service."""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.request
from pathlib import Path

from tests.daemon import LoggedProcess, free_ports

HEALTH_INTERVAL_S = 1  # the gateway asks each worker's HealthCheck this often (its default is 60 s)
# Tests stop the gateway once they are done with it: nothing is in flight to wait for, yet with its default grace
# (180 s) it takes ~5 s to exit after serving a request, ~0.5 s with this.
SHUTDOWN_GRACE_S = 1


def smg_binary() -> str:
    beside_python = Path(sys.executable).with_name("smg")
    found = str(beside_python) if beside_python.exists() else shutil.which("smg")
    if found is None:
        raise RuntimeError(f"the smg gateway is not installed (not beside {sys.executable}, not on PATH): "
                           "run `make install-dev`")
    return found


class Gateway(LoggedProcess):
    """`smg launch` routing to the given worker addresses (host:port, gRPC) with the given flags; stopped with
    SIGTERM on close(). Workers are health-checked every second and taken out at the first failure."""

    def __init__(self, worker_addresses: list[str], *flags: str, log_path: Path, http: bool = False):
        """http: route to the workers' OpenAI HTTP API (host:port of it) instead of their gRPC worker protocol."""
        self.port, self.metrics_port = free_ports(2)
        self.root_url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.root_url + "/v1"
        workers = [f"http://{a}" for a in worker_addresses] if http else [f"grpc://{a}" for a in worker_addresses]
        cmd = [smg_binary(), "launch", "--host", "127.0.0.1", "--port", str(self.port),
               "--prometheus-host", "127.0.0.1", "--prometheus-port", str(self.metrics_port),
               "--worker-urls", *workers, *(() if http else ("--backend", "vllm")),
               "--health-check-interval-secs", str(HEALTH_INTERVAL_S), "--health-failure-threshold", "1",
               "--health-success-threshold", "1", "--shutdown-grace-period-secs", str(SHUTDOWN_GRACE_S), *flags]
        super().__init__(cmd, log_path)

    def wait_ready(self, model_name: str | None = None, num_workers: int = 1, timeout: float = 120) -> Gateway:
        """Until every worker is healthy, /models lists the model (default: the first listed) and a one-token
        completion of it succeeds: the gateway lists a worker before it has the tokenizer, which it fetches from
        the worker."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smg exited with {self.proc.returncode}:\n{self.log()}")
            try:
                listed = [m["id"] for m in self.call("/models").get("data", [])]
                name = model_name or (listed[0] if listed else None)
                probe = dict(model=name, prompt="hi", max_tokens=1)
                if (name in listed and len(self.healthy_workers()) >= num_workers
                        and self.call("/completions", probe).get("choices")):
                    return self
            except (OSError, ValueError):  # not listening yet, an error status, or not JSON yet
                pass
            time.sleep(0.2)
        raise TimeoutError(f"smg not serving {model_name or 'a model'} after {timeout} s:\n{self.log()[-5000:]}")

    def healthy_workers(self) -> set[str]:
        """host:port of the workers the gateway routes to now."""
        with urllib.request.urlopen(self.root_url + "/workers", timeout=5) as response:
            workers = json.loads(response.read())["workers"]
        return {w["url"].split("://", 1)[-1] for w in workers if w["is_healthy"]}

    def call(self, path: str, body: dict | None = None) -> dict:
        """GET path, or POST body to it, as JSON; raises urllib.error.HTTPError on an error status."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
