"""Wall time of the command line's client commands, each a fresh process: `beastserve --help`,
`beastserve serve --help`, and `beastserve health` against a port where nothing listens (it answers at once:
connection refused), so the figure is the interpreter's start and the command's imports.

    python -m bench.cli_startup [--repeats 10] [--out bench/results/cli_startup_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.startup import free_port
from server.loadgen import machine

COMMANDS = {"--help": ["--help"], "serve --help": ["serve", "--help"],
            "health (nothing listening)": ["health", "--address", f"127.0.0.1:{free_port()}"]}


def wall_times(argv: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "server.cli", *argv], capture_output=True, check=False)
        times.append(round(time.perf_counter() - start, 3))
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10, help="runs of each command (median reported)")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    command = " ".join(["python -m bench.cli_startup", *(sys.argv[1:] if argv is None else argv)])
    results = {"machine": machine.machine_facts(), "command": command, "commands": {}}
    for name, cli_args in COMMANDS.items():
        times = wall_times(cli_args, args.repeats)
        results["commands"][name] = {"wall_s": times, "median_s": statistics.median(times)}
        print(f"beastserve {name}: median {statistics.median(times):.3f} s (min {min(times):.3f}, "
              f"max {max(times):.3f}, {args.repeats} runs)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
