"""Start-up as an operator sees it: a taken or invalid port ends `serve` at once with one line, before the model
loads; `beastserve health` says ready only once the model is."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from server.client import Client
from server.security import exposure_warning
from tests.daemon import ROOT, free_port


def serve(model, *flags: str) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
           "--http-port", "off", *flags]
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return done, time.monotonic() - start


def held_port(reuse_port: bool) -> socket.socket:
    """A listening socket on a free loopback port; with reuse_port, as a gRPC server holds its port."""
    sock = socket.socket()
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def last_line(done: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("reuse_port", [False, True])
def test_a_taken_grpc_port_exits_at_once_naming_it(tiny_model_dir, reuse_port):
    with held_port(reuse_port) as sock:
        port = sock.getsockname()[1]
        done, seconds = serve(tiny_model_dir[0], "--port", str(port), "--metrics-port", "0")
    assert done.returncode != 0
    assert last_line(done).startswith(f"beastserve: port {port} is already in use")
    assert "loading" not in done.stderr.lower() and "KV cache" not in done.stderr  # the model never loaded
    assert seconds < 30


def test_a_taken_metrics_port_exits_at_once_naming_it(tiny_model_dir):
    with held_port(False) as sock:
        port = sock.getsockname()[1]
        done, _ = serve(tiny_model_dir[0], "--port", str(free_port()), "--metrics-port", str(port))
    assert done.returncode != 0
    assert last_line(done) == f"beastserve: metrics port {port} is already in use"
    assert "Event loop is closed" not in done.stderr


def test_a_taken_http_port_exits_at_once_naming_it(tiny_model_dir):
    with held_port(False) as sock:
        port = sock.getsockname()[1]
        done, _ = serve(tiny_model_dir[0], "--port", str(free_port()), "--metrics-port", "0", "--http-port", str(port))
    assert done.returncode != 0
    assert last_line(done) == f"beastserve: HTTP port {port} is already in use"
    assert "loading" not in done.stderr.lower()


@pytest.mark.parametrize("flag, value", [("--port", "99999"), ("--port", "0"), ("--metrics-port", "-1")])
def test_an_invalid_port_is_refused_before_anything_starts(flag, value):
    done, _ = serve("default", flag, value)
    assert done.returncode == 2
    lowest = 1 if flag == "--port" else 0
    assert last_line(done) == f"beastserve: {flag} must be in [{lowest}, 65535], got {value}"


def test_health_is_not_ready_while_the_model_loads_and_wait_waits_for_it(tiny_model_dir, tmp_path):
    from server.cli import main
    from tests.daemon import Daemon

    daemon = Daemon(tiny_model_dir[0], "--max-num-seqs", "4", log_path=tmp_path / "daemon.log")
    try:
        # Asked at once: the port is not open yet, or open with the model still loading.
        assert main(["health", "--address", daemon.address]) == 1
        assert main(["health", "--address", daemon.address, "--wait", "120"]) == 0
        assert daemon.health() == "SERVING"
        assert "neither TLS nor API keys" not in daemon.log()  # on loopback: nothing to warn about
    finally:
        daemon.close()


@pytest.mark.parametrize("flags, line", [
    (["--model", "/nonexistent/model.gguf"], "beastserve: --model /nonexistent/model.gguf: no such file or directory"),
    (["--max-num-seqs", "0"], "beastserve: --max-num-seqs must be an integer >= 1, got 0"),
    (["--gpu-memory-utilization", "1.5"], "beastserve: --gpu-memory-utilization must be in (0, 1], got 1.5"),
    (["--speculative", "draft", "--draft-model", "/nonexistent"],
     "beastserve: --draft-model /nonexistent: no such file or directory"),
])
def test_a_misconfigured_start_fails_at_once_with_one_line_naming_the_flag(flags, line):
    done, seconds = serve("default", *flags, "--port", str(free_port()), "--metrics-port", "0")
    assert done.returncode == 2 and last_line(done) == line and len(done.stderr.strip().splitlines()) == 1
    assert seconds < 30


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_without_cuda_fails_before_loading():
    done, _ = serve("default", "--device", "cuda", "--port", str(free_port()))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert last_line(done).startswith("beastserve: --device cuda: CUDA is not available here")


def hub_cache_with(model_dir, repo_id: str, root) -> dict[str, str]:
    """A Hugging Face cache holding `repo_id` (the layout huggingface_hub writes), and the environment that
    makes it the only place to look: the hub is never asked."""
    owner, name = repo_id.split("/")
    repo, commit = root / "hub" / f"models--{owner}--{name}", "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return {"HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1"}


def test_a_hugging_face_model_id_loads_from_the_local_cache(tiny_model_dir, tmp_path):
    from tests.daemon import Daemon

    env = hub_cache_with(tiny_model_dir[0], "tiny-org/tiny-llama", tmp_path)
    daemon = Daemon("tiny-org/tiny-llama", "--host", "0.0.0.0", log_path=tmp_path / "daemon.log", env=env)
    try:
        daemon.wait_ready()
        with Client(daemon.address, timeout=30) as client:
            assert client.model_info().model == "tiny-org/tiny-llama"  # the id, as clients know it
            assert len(client.generate([1, 2, 3], max_tokens=4, temperature=0).token_ids) == 4
        # Open to the network with neither TLS nor keys: said once, at start-up.
        assert "neither TLS nor API keys" in daemon.log()
    finally:
        daemon.close()


def test_a_model_id_missing_from_an_offline_cache_fails_at_once(tmp_path):
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", "nobody/no-such-model", "--host", "127.0.0.1",
           "--port", str(free_port()), "--metrics-port", "0", "--http-port", "0"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(tmp_path),
                               "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert last_line(done).startswith("beastserve: --model nobody/no-such-model is not in the Hugging Face cache")


@pytest.mark.parametrize("host, warned", [("0.0.0.0", True), ("::", True), ("10.1.2.3", True), ("myhost", True),
                                          ("127.0.0.1", False), ("::1", False), ("localhost", False)])
def test_listening_beyond_loopback_without_tls_or_keys_is_warned_about(host, warned):
    assert (exposure_warning(host, tls=False, api_keys=False) is not None) == warned
    assert exposure_warning(host, tls=True, api_keys=False) is None
    assert exposure_warning(host, tls=False, api_keys=True) is None


@pytest.mark.parametrize("host, warned", [("0.0.0.0", True), ("10.1.2.3", True), ("127.0.0.1", False)])
def test_the_warning_names_the_metrics_port_which_listens_on_the_same_host(host, warned):
    """/metrics is plaintext and open whatever protects the gRPC port: the warning says so, TLS and keys or not."""
    for tls, api_keys in ((False, False), (True, False), (False, True)):
        warning = exposure_warning(host, tls=tls, api_keys=api_keys, metrics_port=9400)
        assert (warning is not None and "9400" in warning and "metrics" in warning) == warned
    assert exposure_warning(host, tls=True, api_keys=True, metrics_port=0) is None
