"""deploy/local-gateway.sh (`make gateway`), run as a user runs it: two replicas behind smg. A replica killed
outright is reported and started again while the gateway goes on answering; Ctrl-C drains and exits 0; a port
already taken stops the script at once with one line."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.daemon import READINESS, ROOT, LoggedProcess, free_port, sigint_by_default

SCRIPT = ["bash", "deploy/local-gateway.sh"]


def _free_range(n: int) -> int:
    """The first of n consecutive free loopback ports."""
    while True:
        first = free_port()
        try:
            for port in range(first, first + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue


def _env(model: Path, **ports: int) -> dict:
    bin_dir = Path(sys.executable).parent
    return {**os.environ, "PYTHONPATH": str(ROOT), "BIN": str(bin_dir), "MODEL": str(model), "REPLICAS": "2",
            "GRPC_PORT": str(_free_range(2)), "METRICS_PORT": str(_free_range(2)), "HTTP_PORT": str(free_port()),
            "GATEWAY_METRICS_PORT": str(free_port()), "HEALTH_INTERVAL": "1", "GATEWAY_GRACE": "1",
            **{k: str(v) for k, v in ports.items()}}


def _wait_for(predicate, timeout: float, what: str, process: LoggedProcess):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            raise AssertionError(f"the script exited ({process.proc.returncode}) waiting for {what}:\n{process.log()}")
        try:
            if value := predicate():
                return value
        except OSError:  # not answering yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}\n{process.log()}")


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=READINESS),
                                                              timeout=2)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _complete(env: dict, model: str) -> bool:
    body = json.dumps(dict(model=model, prompt="hi", max_tokens=2)).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{env['HTTP_PORT']}/v1/completions", data=body,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return bool(json.loads(response.read()).get("choices"))


def test_a_killed_replica_is_restarted_and_ctrl_c_drains(tiny_text_model_dir, tmp_path):
    model = tiny_text_model_dir[0]
    env = _env(model)
    script = LoggedProcess(SCRIPT, tmp_path / "gateway.log", cwd=ROOT, env=env, preexec_fn=sigint_by_default)
    try:
        _wait_for(lambda: _complete(env, model.resolve().name), 120, "the gateway answering", script)
        pid = int(re.search(r"replica 0 \(pid (\d+)\)", script.log())[1])
        os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: f"replica 0 (pid {pid}) exited" in script.log(), 10, "the loss reported", script)
        _wait_for(lambda: _complete(env, model.resolve().name), 10, "the survivor answering", script)
        _wait_for(lambda: _serving(f"127.0.0.1:{env['GRPC_PORT']}"), 60, "replica 0 serving again", script)
        assert len(re.findall(r"replica 0 \(pid \d+\) on", script.log())) == 2
        script.proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert script.proc.wait(timeout=60) == 0, script.log()
    finally:
        script.close()


def test_a_taken_port_stops_the_script_at_once(tiny_text_model_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = _env(tiny_text_model_dir[0], GRPC_PORT=port)
        started = time.monotonic()
        script = subprocess.Popen(SCRIPT, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True)
        try:
            _, stderr = script.communicate(timeout=10)
        finally:
            if script.poll() is None:  # it went on to start replicas: stop them with it
                os.killpg(script.pid, signal.SIGTERM)
                script.wait(timeout=60)
    assert script.returncode == 1 and time.monotonic() - started < 5
    assert stderr.strip().splitlines() == [
        f"local-gateway: port {port} (replica 0, from GRPC_PORT) is already in use; set GRPC_PORT to a free range"]


def test_the_scripts_default_ports_are_clear_of_a_daemons_so_make_serve_and_make_gateway_run_side_by_side():
    from server.config import ServerConfig

    script = (ROOT / "deploy" / "local-gateway.sh").read_text()
    default = {name: int(re.search(rf"^{name}=\${{{name}:-(\d+)}}", script, re.M).group(1))
               for name in ("GRPC_PORT", "METRICS_PORT", "HTTP_PORT", "GATEWAY_METRICS_PORT")}
    replicas = 4
    gateway_ports = {default["HTTP_PORT"], default["GATEWAY_METRICS_PORT"]}
    gateway_ports |= {default[name] + i for name in ("GRPC_PORT", "METRICS_PORT") for i in range(replicas)}
    daemon = ServerConfig()
    assert not gateway_ports & {daemon.port, daemon.metrics_port, int(daemon.http_port)}
