"""Reporting for server/loadgen/load.py: the markdown tables and the latency/throughput plot."""

from __future__ import annotations

import math
from pathlib import Path

LATENCIES = ("ttft", "tpot", "itl", "e2e")  # each reported in ms as mean, median, p90, p99


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def to_markdown(result: dict) -> str:
    m, s, w = result["machine"], result["server"], result["workload"]
    load = " → ".join(", ".join(f"{x:.2f}" for x in m[key]) for key in ("load_average_at_start", "load_average_at_end"))
    prompts = "random token ids" if w["token_ids"] else "random words"
    dataset = (f"synthetic {prompts}, input {w['input_len']}, output {w['output_len']}, range ratio {w['range_ratio']}"
               if w["dataset"] == "synthetic" else f"{w['dataset_path']}")
    arrivals = "Poisson arrivals" if w["burstiness"] == 1 else f"gamma arrivals (burstiness {w['burstiness']})"
    lines = ["# Serving load", "",
             f"{m['date']} · {m['cpu']} · {m['logical_cores']} cores · load average (start → end) {load} · "
             f"{s['backend']} {s['address']} · model {s['model']}", "",
             f"{w['num_requests']} requests per rate (+{w['warmup_requests']} warm-up) · {dataset} · "
             f"{'chat' if w['chat'] else 'plain'} · {'EOS ignored' if w['ignore_eos'] else 'stops at EOS'} · "
             f"temperature {w['temperature']} · {arrivals} · max concurrency {w['max_concurrency'] or 'none'} · "
             f"seed {w['seed']}"]
    if w["goodput_slos_ms"]:
        lines[-1] += " · goodput: " + ", ".join(f"{k.upper()} ≤ {v:g} ms" for k, v in w["goodput_slos_ms"].items())
    if result.get("note"):
        lines += ["", f"Note: {result['note']}"]
    lines += ["", "| request rate | duration s | completed | failed | req/s | output tok/s | total tok/s | "
                  "goodput req/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["passes"]:
        failed = str(row["failed"]) + "".join(f" ({code} {n})" for code, n in row["failures"].items())
        goodput = "—" if row["goodput"] is None else f"{row['goodput']:.2f}"
        lines.append(f"| {row['request_rate']} | {row['duration_s']:.1f} | {row['completed']} | {failed} | "
                     f"{row['request_throughput']:.2f} | {row['output_throughput']:.1f} | "
                     f"{row['total_token_throughput']:.1f} | {goodput} |")
    lines += ["", "| request rate | latency | mean ms | p50 ms | p90 ms | p99 ms |", "|---|---|---:|---:|---:|---:|"]
    for row in result["passes"]:
        for name in LATENCIES:
            d = row[f"{name}_ms"]
            cells = ["—"] * 4 if d is None else [f"{d[k]:.1f}" for k in ("mean", "median", "p90", "p99")]
            lines.append(f"| {row['request_rate']} | {name.upper()} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["passes"]
    x, labels = range(len(rows)), [str(row["request_rate"]) for row in rows]  # evenly spaced, so inf has a place
    fig, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, quantile, style in (("ttft", "median", "o-"), ("ttft", "p99", "o--"),
                                  ("tpot", "median", "s-"), ("tpot", "p99", "s--")):
        values = [row[f"{name}_ms"][quantile] if row[f"{name}_ms"] else math.nan for row in rows]
        latency.plot(x, values, style, label=f"{name.upper()} {'p50' if quantile == 'median' else quantile}")
    latency.set(yscale="log", ylabel="ms", title="Latency")
    throughput.plot(x, [row["output_throughput"] for row in rows], "o-", label="output tok/s")
    throughput.set(ylabel="output tokens/s", title="Output throughput")
    throughput.set_ylim(bottom=0)
    for ax in (latency, throughput):
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("request rate (req/s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    m = result["machine"]
    fig.suptitle(f"{result['server']['model']} · {m['cpu']} · {m['logical_cores']} cores · {m['date'][:10]}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COMPARED = (("ttft", "median"), ("ttft", "p99"), ("tpot", "median"), ("tpot", "p99"), ("itl", "p99"),
            ("e2e", "median"), ("e2e", "p99"))


def compare_markdown(runs: dict[str, dict], title: str) -> str:
    """One row per request rate and run: throughput (with its ratio to the first run's) and latency quantiles."""
    names, first = list(runs), next(iter(runs.values()))
    m, s = first["machine"], first["server"]
    lines = [f"# {title}", "", f"{m['date']} · {m['cpu']} · {m['logical_cores']} cores · model {s['model']}", ""]
    lines += [f"- {name}: {run.get('note') or '(no note)'}" for name, run in runs.items()]
    by_rate = {name: {row["request_rate"]: row for row in run["passes"]} for name, run in runs.items()}
    quantiles = " | ".join(f"{n.upper()} {'p50' if q == 'median' else q} ms" for n, q in COMPARED)
    lines += ["", f"| request rate | run | completed | failed | output tok/s | {quantiles} |",
              "|---|---|---:|---:|---:|" + "---:|" * len(COMPARED)]
    for rate in (row["request_rate"] for row in first["passes"]):
        base = by_rate[names[0]].get(rate)
        for name in names:
            row = by_rate[name].get(rate)
            if row is None:
                continue
            ratio = f" ({row['output_throughput'] / base['output_throughput']:.2f}x)" \
                if name != names[0] and base and base["output_throughput"] else ""
            cells = ["—" if row[f"{n}_ms"] is None else f"{row[f'{n}_ms'][q]:,.1f}" for n, q in COMPARED]
            lines.append(f"| {rate} | {name} | {row['completed']} | {row['failed']} | "
                         f"{row['output_throughput']:,.1f}{ratio} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(description="Compare load-generator results side by side, the first as the base.")
    p.add_argument("runs", nargs="+", metavar="NAME=RESULT.json")
    p.add_argument("--title", default="Serving load")
    p.add_argument("--out", type=Path, required=True, help="markdown file to write")
    args = p.parse_args(argv)
    runs = {}
    for item in args.runs:
        name, sep, path = item.partition("=")
        if not sep:
            p.error(f"expected NAME=RESULT.json, got {item!r}")
        runs[name] = json.loads(Path(path).read_text())
    args.out.write_text(compare_markdown(runs, args.title))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
