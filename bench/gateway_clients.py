"""One unbounded-rate pass of server/loadgen/load.py split over several client processes that start together, to
tell a server's limit from the client's: one Python process parsing every streamed chunk through the openai SDK
can saturate its core before a fast server does. Each process sends --num-requests / --clients requests (its own
seed, so its own prompts), all at once, after a start barrier on the wall clock; the report gives each process's
CPU seconds over its pass (near its wall seconds: that client was the bottleneck) and the output throughput of the
whole (all output tokens over the longest pass).

    python -m bench.gateway_clients --clients 4 --out-json F.json -- --backend openai --base-url URL \\
        --num-requests 120 --input-len 256 --output-len 128 --ignore-eos
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
from pathlib import Path

STARTUP_S = 6.0  # time every process has to import and open its client before the common start


def one_client(load_argv: list[str], seed: int, start_at: float) -> dict:
    from server.loadgen import load

    args = load.parse_args([*load_argv, "--seed", str(seed), "--request-rate", "inf", "--warmup-requests", "0",
                            "--no-progress"])
    time.sleep(max(0.0, start_at - time.time()))
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = asyncio.run(load.run(args))
    result["client"] = dict(seed=seed, wall_s=time.perf_counter() - wall0, cpu_s=time.process_time() - cpu0)
    return result


def stat(summary: dict, latency: str, key: str) -> float | None:
    """One statistic of a pass's latency; None where no request of the pass gave that latency."""
    return (summary[latency] or {}).get(key)


def fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--out-json", type=Path, required=True)
    p.add_argument("--name", default="", help="a label written into the results")
    p.add_argument("load_args", nargs=argparse.REMAINDER, help="after --: server.loadgen.load's arguments")
    args = p.parse_args(argv)
    load_argv = args.load_args[1:] if args.load_args[:1] == ["--"] else args.load_args
    total = int(load_argv[load_argv.index("--num-requests") + 1])
    per_client = total // args.clients
    load_argv = list(load_argv)
    load_argv[load_argv.index("--num-requests") + 1] = str(per_client)
    start_at = time.time() + STARTUP_S
    with multiprocessing.get_context("spawn").Pool(args.clients) as pool:
        results = pool.starmap(one_client, [(load_argv, seed, start_at) for seed in range(1, args.clients + 1)])
    passes = [r["passes"][0] for r in results]
    output_tokens = sum(x["total_output_tokens"] for x in passes)
    longest = max(x["duration_s"] for x in passes)
    summary = dict(
        name=args.name, clients=args.clients, requests_per_client=per_client,
        completed=sum(x["completed"] for x in passes), failed=sum(x["failed"] for x in passes),
        output_tokens=output_tokens, longest_pass_s=longest, output_throughput=output_tokens / longest,
        per_client=[dict(duration_s=x["duration_s"], cpu_s=r["client"]["cpu_s"], wall_s=r["client"]["wall_s"],
                         output_throughput=x["output_throughput"],
                         ttft_p50_ms=stat(x, "ttft_ms", "median"), ttft_p99_ms=stat(x, "ttft_ms", "p99"),
                         tpot_p50_ms=stat(x, "tpot_ms", "median"), tpot_p99_ms=stat(x, "tpot_ms", "p99"),
                         e2e_p50_ms=stat(x, "e2e_ms", "median")) for x, r in zip(passes, results)],
        server=results[0]["server"], workload=results[0]["workload"], machine=results[0]["machine"])
    args.out_json.write_text(json.dumps(summary, indent=2) + "\n")
    cpu = ", ".join(f"{c['cpu_s']:.2f}/{c['wall_s']:.2f}" for c in summary["per_client"])
    ttft = ", ".join(fmt(c["ttft_p50_ms"], 0) for c in summary["per_client"])
    tpot = ", ".join(fmt(c["tpot_p50_ms"], 1) for c in summary["per_client"])
    print(f"{args.name}: {args.clients} client(s) x {per_client} requests at once: {summary['completed']} done,"
          f" {summary['failed']} failed, {summary['output_throughput']:.0f} output tok/s over {longest:.2f} s;"
          f" client CPU/wall s {cpu}; TTFT p50 ms {ttft}; TPOT p50 ms {tpot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
