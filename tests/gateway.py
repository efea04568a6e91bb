"""Start the smg gateway in a subprocess on free loopback ports, in front of running daemons, for end-to-end tests
of the OpenAI API it serves over the daemons' vllm.grpc.engine.VllmEngine service."""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.request
from pathlib import Path

from tests.daemon import LoggedProcess, free_port


def smg_binary() -> str:
    beside_python = Path(sys.executable).with_name("smg")
    found = str(beside_python) if beside_python.exists() else shutil.which("smg")
    if found is None:
        raise RuntimeError(f"the smg gateway is not installed (not beside {sys.executable}, not on PATH): "
                           "run `make install-dev`")
    return found


class Gateway(LoggedProcess):
    """`smg launch` routing to the given worker addresses (host:port, gRPC) with the given flags; stopped with
    SIGTERM on close()."""

    def __init__(self, worker_addresses: list[str], *flags: str, log_path: Path):
        self.port, self.metrics_port = free_port(), free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        cmd = [smg_binary(), "launch", "--host", "127.0.0.1", "--port", str(self.port),
               "--prometheus-host", "127.0.0.1", "--prometheus-port", str(self.metrics_port),
               "--worker-urls", *(f"grpc://{address}" for address in worker_addresses), "--backend", "vllm", *flags]
        super().__init__(cmd, log_path)

    def wait_ready(self, model_name: str, timeout: float = 120) -> Gateway:
        """Until /models lists the model and a one-token completion of it succeeds: the gateway lists a worker
        before it has the tokenizer, which it fetches from the worker."""
        deadline = time.monotonic() + timeout
        probe = dict(model=model_name, prompt="hi", max_tokens=1)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smg exited with {self.proc.returncode}:\n{self.log()}")
            try:
                listed = [m["id"] for m in self.call("/models").get("data", [])]
                if model_name in listed and self.call("/completions", probe).get("choices"):
                    return self
            except (OSError, ValueError):  # not listening yet, an error status, or not JSON yet
                pass
            time.sleep(0.2)
        raise TimeoutError(f"smg not serving {model_name!r} after {timeout} s:\n{self.log()}")

    def call(self, path: str, body: dict | None = None) -> dict:
        """GET path, or POST body to it, as JSON; raises urllib.error.HTTPError on an error status."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
