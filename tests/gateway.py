"""Start the real gateway (smg, from PyPI) in a subprocess in front of daemons, for end-to-end tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.daemon import free_port

HEALTH_INTERVAL_S = 1  # the gateway asks each worker's HealthCheck this often (its default is 60 s)


def smg_binary() -> str:
    found = shutil.which("smg") or str(Path(sys.executable).parent / "smg")
    if not Path(found).is_file():
        raise RuntimeError("the smg gateway is not installed; run `make install-dev` (it installs smg from PyPI)")
    return found


class Gateway:
    """`smg launch --backend vllm` in front of the given daemons' gRPC addresses; killed on close()."""

    def __init__(self, worker_addresses: list[str], *flags: str, log_path: Path):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        cmd = [smg_binary(), "launch", "--backend", "vllm", "--host", "127.0.0.1", "--port", str(self.port),
               "--worker-urls", *(f"grpc://{a}" for a in worker_addresses),
               "--health-check-interval-secs", str(HEALTH_INTERVAL_S), "--health-failure-threshold", "1",
               "--health-success-threshold", "1", "--log-level", "info",
               "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()), *flags]
        self.log_path = log_path
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.base_url + path, timeout=5) as response:
            return json.loads(response.read())

    def complete(self, model: str) -> bool:
        body = json.dumps({"model": model, "prompt": "Hi", "max_tokens": 1}).encode()
        request = urllib.request.Request(self.base_url + "/v1/completions", body, {"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status == 200
        except urllib.error.HTTPError:
            return False

    def healthy_workers(self) -> set[str]:
        return {w["url"].removeprefix("grpc://") for w in self.get("/workers")["workers"] if w["is_healthy"]}

    def wait_ready(self, num_workers: int = 1, timeout: float = 60) -> Gateway:
        """Until the gateway lists its workers as healthy and serves the model list."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            try:
                models = self.get("/v1/models")["data"]
                # Ready once it routes to every worker and has registered the tokenizer it fetched from them.
                if len(self.healthy_workers()) >= num_workers and models and self.complete(models[0]["id"]):
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"gateway not ready after {timeout} s:\n{self.log()[-5000:]}")

    def log(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
