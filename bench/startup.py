"""Start-up time of `beastserve serve --model default` as a process: launch to readiness (gRPC health
SERVING for beastserve.v1.Generation), first with an empty cache directory, then `--repeats` more
starts that reuse it.

    python -m bench.startup [--repeats 3] [--out bench/results/startup_cpu.json]

The cache lives in a temporary XDG_CACHE_HOME, so the user's own cache is never read or written.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.loadgen import machine

READINESS = "beastserve.v1.Generation"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="starts after the first (median reported)")
    p.add_argument("--model", default="default")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one start may take")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=READINESS)
            return stub.Check(request, timeout=1).status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def one_start(model: str, cache_home: str, timeout: float) -> dict:
    """Seconds from Popen to SERVING, and the daemon's own log of the start."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", "0", "--http-port", str(free_port())]
    env = {**os.environ, "XDG_CACHE_HOME": cache_home, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while not ready(f"127.0.0.1:{port}"):
                if proc.poll() is not None or time.perf_counter() - start > timeout:
                    log.seek(0)
                    raise RuntimeError(f"daemon did not become ready:\n{log.read()}")
                time.sleep(0.05)
            seconds = time.perf_counter() - start
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        log.seek(0)
        return dict(seconds=round(seconds, 2), log=log.read())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    facts = machine.machine_facts()
    with tempfile.TemporaryDirectory(prefix="beastserve-startup-") as cache_home:
        starts = [one_start(args.model, cache_home, args.timeout) for _ in range(1 + args.repeats)]
    first, later = starts[0], starts[1:]
    shown = sys.argv[1:] if argv is None else argv
    result = dict(machine=facts, model=args.model, command=" ".join(["python -m bench.startup", *shown]),
                  first_s=first["seconds"], later_s=[s["seconds"] for s in later],
                  later_median_s=statistics.median(s["seconds"] for s in later) if later else None)
    for name, start in (("first start", first), ("a later start", later[-1] if later else None)):
        if start is not None:
            print(f"--- {name}: {start['seconds']:.2f} s; its log:\n{start['log']}")
    print(json.dumps(result, indent=2))
    if args.out:
        result["logs"] = [s["log"] for s in starts]
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
