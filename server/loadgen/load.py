"""Serving benchmark against a running server, in the manner of vLLM's benchmark_serving.py: requests arrive
at a Poisson (or gamma) rate over streaming gRPC calls to the daemon or streaming requests to an OpenAI-compatible
HTTP server (vLLM's, or beastserve behind a gateway); it reports throughput, goodput and the TTFT, TPOT, ITL and
end-to-end latency distributions, for one request rate or a sweep of them.

    python -m server.loadgen.load --address 127.0.0.1:50051 --num-requests 64 --input-len 128 --output-len 64 \\
        --ignore-eos --sweep 0.5,1,2,inf --plot load.png      # also: beastserve bench ...
    python -m server.loadgen.load --backend openai --base-url http://127.0.0.1:8000/v1 --ignore-eos ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from server.cli_client import _add_connection_args
from server.loadgen.backends import BACKENDS, DEFAULT_BASE_URL, Record, Request, ServerError, open_backend
from server.loadgen.machine import machine_facts
from server.loadgen.report import plot, rate_label, to_markdown

# Common English words, each one token (with its leading space) for the usual BPE vocabularies, so a prompt of
# n words is close to n tokens; the daemon's usage gives the exact count.
WORDS = ("the of and to in is that it for was on are as with his they at be this have from or one had by word but "
         "not what all were we when your can said there use each which she do how their if will up other about out "
         "many then them these so some her would make like him into time has look two more write go see number no "
         "way could people my than first water been call who oil its now find long down day did get come made may "
         "part over new sound take only little work know place year live me back give most very after thing our "
         "just name good sentence man think say great where help through much before line right too mean old any "
         "same tell boy follow came want show also around form three small set put end does another well large must "
         "big even such because turn here why").split()
GOODPUT_SLOS = ("ttft", "tpot", "e2e")


# --- arguments -----------------------------------------------------------------------------------------------------

def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=BACKENDS, default="grpc",
                   help="grpc: the daemon's streaming RPC at --address; openai: an OpenAI-compatible HTTP server at"
                        " --base-url (default: %(default)s)")
    p.add_argument("--base-url", help=f"for --backend openai: the API's root (default: {DEFAULT_BASE_URL})")
    p.add_argument("--model", help="for --backend openai: the model to ask for (default: the first that GET"
                                   " /models lists)")
    _add_connection_args(p)
    p.add_argument("--dataset", choices=["synthetic", "jsonl"], default="synthetic", help="where prompts come from"
                                                                                          " (default: %(default)s)")
    p.add_argument("--dataset-path", type=Path, help="for --dataset jsonl: lines of {\"prompt\", \"output_len\"?}"
                                                     " (default: none)")
    p.add_argument("--input-len", type=int, default=128, help="synthetic prompt length, in words or token ids"
                                                              " (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens per request (jsonl: where not given)"
                                                              " (default: %(default)s)")
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="synthetic lengths uniform in [len * (1 - r), len * (1 + r)] (default: %(default)s)")
    p.add_argument("--token-ids", action="store_true", help="synthetic prompts as random token ids, not words")
    p.add_argument("--chat", action="store_true", help="send each prompt as a user chat message")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly max_tokens per request")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--num-requests", type=int, default=64, help="requests per request rate (default: %(default)s)")
    p.add_argument("--warmup-requests", type=int, default=1, help="sent all at once first, not counted"
                                                                  " (default: %(default)s)")
    p.add_argument("--request-rate", type=parse_rate, default=math.inf, help="requests/s, or inf = all at once"
                                                                             " (default: %(default)s)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival gaps: 1 = Poisson, lower = burstier, higher = more even"
                        " (default: %(default)s)")
    p.add_argument("--max-concurrency", type=int, help="most requests in flight; later arrivals wait for a slot"
                                                       " (default: none)")
    p.add_argument("--sweep", type=parse_rates, help="request rates to run one pass each, e.g. 1,2,4,inf"
                                                     " (default: none)")
    p.add_argument("--goodput", nargs="+", type=parse_slo, metavar="METRIC:MS",
                   help="SLOs (ttft, tpot, e2e in ms) a request must all meet to count towards goodput"
                        " (default: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts and arrival times"
                                                       " (default: %(default)s)")
    p.add_argument("--out-json", type=Path, help="write the results as JSON here (default: none)")
    p.add_argument("--out-md", type=Path, help="write the results as a Markdown table here (default: none)")
    p.add_argument("--plot", type=Path, help="PNG of latency and throughput against request rate (default: none)")
    p.add_argument("--note", help="a remark written into the results (e.g. about the machine) (default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = build_parser(prog)
    args = p.parse_args(argv)
    for name, low in (("input_len", 1), ("output_len", 1), ("num_requests", 1), ("warmup_requests", 0),
                      ("max_concurrency", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if not 0 <= args.range_ratio < 1:
        p.error(f"--range-ratio must be in [0, 1), got {args.range_ratio}")
    if not args.burstiness > 0:
        p.error(f"--burstiness must be > 0, got {args.burstiness}")
    if args.dataset == "jsonl" and args.dataset_path is None:
        p.error("--dataset jsonl needs --dataset-path")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        p.error("--plot needs matplotlib (pip install matplotlib, or the dev extra)")
    if args.chat and args.token_ids:
        p.error("--chat sends text; it cannot go with --token-ids")
    check_backend_args(p, args)
    return args


def check_backend_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.backend == "grpc":
        for name in ("base_url", "model"):
            if getattr(args, name) is not None:
                p.error(f"--{name.replace('_', '-')} is for --backend openai")
        return
    args.base_url = args.base_url or DEFAULT_BASE_URL
    for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        if getattr(args, name) is not None:
            p.error(f"--{name.replace('_', '-')} is for --backend grpc (give an https:// --base-url instead)")
    if args.token_ids:
        p.error("--token-ids needs --backend grpc: the vocabulary size comes from the daemon")
    if importlib.util.find_spec("openai") is None:
        p.error("--backend openai needs the openai package (pip install openai, or the dev extra)")


def parse_rate(text: str) -> float:
    rate = float(text)
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"a request rate must be > 0 or inf, got {text}")
    return rate


def parse_rates(text: str) -> list[float]:
    return [parse_rate(part) for part in text.split(",")]


def parse_slo(text: str) -> tuple[str, float]:
    name, _, ms = text.partition(":")
    if name not in GOODPUT_SLOS:
        raise argparse.ArgumentTypeError(f"a goodput SLO is one of {', '.join(GOODPUT_SLOS)}, got {name!r}")
    try:
        return name, float(ms)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: the SLO must be milliseconds, got {ms!r}") from None


# --- workload ------------------------------------------------------------------------------------------------------

def synthetic_requests(n: int, args: argparse.Namespace, vocab_size: int, rng: np.random.Generator) -> list[Request]:
    input_lens = uniform_lengths(args.input_len, args.range_ratio, n, rng)
    output_lens = uniform_lengths(args.output_len, args.range_ratio, n, rng)
    requests = []
    for input_len, output_len in zip(input_lens, output_lens):
        if args.token_ids:
            prompt = rng.integers(0, vocab_size, input_len).tolist()
        else:
            prompt = " ".join(rng.choice(WORDS, input_len))
        requests.append(Request(prompt, int(input_len), int(output_len)))
    return requests


def uniform_lengths(mean: int, range_ratio: float, n: int, rng: np.random.Generator) -> np.ndarray:
    low, high = max(1, math.floor(mean * (1 - range_ratio))), math.ceil(mean * (1 + range_ratio))
    return rng.integers(low, high + 1, n)


def jsonl_requests(path: Path, n: int, default_output_len: int) -> list[Request]:
    """The file's requests in order, repeated as needed to make n."""
    pool = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if not isinstance(item.get("prompt"), str):
            raise ValueError(f"{path}:{number}: 'prompt' must be a string")
        output_len = item.get("output_len", default_output_len)
        if not isinstance(output_len, int) or output_len < 1:
            raise ValueError(f"{path}:{number}: 'output_len' must be an integer >= 1, got {output_len!r}")
        pool.append(Request(item["prompt"], len(item["prompt"].split()), output_len))
    if not pool:
        raise ValueError(f"{path}: no requests")
    return [pool[i % len(pool)] for i in range(n)]


def arrival_intervals(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Gaps between n arrivals: gamma with shape `burstiness` and mean 1/rate (shape 1 is a Poisson process);
    all zero for an infinite rate."""
    if math.isinf(rate):
        return np.zeros(n)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


# --- running -------------------------------------------------------------------------------------------------------

async def run_pass(backend, requests: list[Request], intervals: np.ndarray, args: argparse.Namespace,
                   desc: str) -> tuple[list[Record], float]:
    """Sends request i at the sum of intervals[1..i] (the first at once); returns the records and the seconds
    from the first send to the last answer."""
    slots = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    bar = tqdm(total=len(requests), desc=desc, unit="req", disable=args.no_progress, file=sys.stderr)

    async def one(request: Request) -> Record:
        async with slots or contextlib.nullcontext():
            record = await backend.send(request)
        bar.update(1)
        return record

    send_at = np.cumsum(intervals) - intervals[0]
    start = time.perf_counter()
    tasks = []
    for request, offset in zip(requests, send_at):
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        tasks.append(asyncio.create_task(one(request)))
    records = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return records, duration


# --- metrics -------------------------------------------------------------------------------------------------------

def meets_slos(record: Record, slos: dict[str, float]) -> bool:
    values_ms = {"ttft": record.ttft * 1e3, "tpot": record.tpot * 1e3, "e2e": record.e2e * 1e3}
    return record.error is None and all(values_ms[name] <= ms for name, ms in slos.items())


def distribution_ms(seconds: list[float]) -> dict | None:
    if not seconds:
        return None
    ms = np.asarray(seconds) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return dict(mean=float(ms.mean()), median=float(p50), p90=float(p90), p99=float(p99))


def summarize(records: list[Record], duration: float, slos: dict[str, float] | None) -> dict:
    done = [r for r in records if r.error is None]
    input_tokens, output_tokens = sum(r.prompt_tokens for r in done), sum(r.output_tokens for r in done)
    summary = dict(duration_s=duration, completed=len(done), failed=len(records) - len(done),
                   failures=dict(Counter(r.error for r in records if r.error is not None)),
                   total_input_tokens=input_tokens, total_output_tokens=output_tokens,
                   cached_input_tokens=sum(r.cached_tokens for r in done),
                   request_throughput=len(done) / duration, output_throughput=output_tokens / duration,
                   total_token_throughput=(input_tokens + output_tokens) / duration,
                   goodput=sum(meets_slos(r, slos) for r in done) / duration if slos else None)
    summary["ttft_ms"] = distribution_ms([r.ttft for r in done])
    summary["tpot_ms"] = distribution_ms([r.tpot for r in done if r.output_tokens > 1])
    summary["itl_ms"] = distribution_ms([gap for r in done for gap in r.itl])
    summary["e2e_ms"] = distribution_ms([r.e2e for r in done])
    return summary


def write_outputs(result: dict, args: argparse.Namespace) -> None:
    markdown = to_markdown(result)
    print(markdown)
    for path, write in ((args.out_json, lambda p: p.write_text(json.dumps(result, indent=2) + "\n")),
                        (args.out_md, lambda p: p.write_text(markdown)), (args.plot, lambda p: plot(result, p))):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)
            print(f"wrote {path}", file=sys.stderr)


# --- main ----------------------------------------------------------------------------------------------------------

async def run(args: argparse.Namespace) -> dict:
    """Every pass of the benchmark; the result as written to --out-json."""
    machine = machine_facts(python=platform.python_version())
    slos = dict(args.goodput) if args.goodput else None
    rates = args.sweep or [args.request_rate]
    backend = open_backend(args)
    try:
        facts = await backend.facts()

        def workload(n: int, rng: np.random.Generator) -> list[Request]:
            if args.dataset == "jsonl":
                return jsonl_requests(args.dataset_path, n, args.output_len)
            return synthetic_requests(n, args, facts.vocab_size, rng)

        if args.warmup_requests:
            warmup = workload(args.warmup_requests, np.random.default_rng([args.seed, 0]))
            await run_pass(backend, warmup, np.zeros(len(warmup)), args, "warm-up")
        passes = []
        for number, rate in enumerate(rates, 1):
            # Fresh synthetic prompts per pass, so the prefix cache does not carry one pass into the next.
            rng = np.random.default_rng([args.seed, number])
            requests = workload(args.num_requests, rng)
            intervals = arrival_intervals(len(requests), rate, args.burstiness, rng)
            records, duration = await run_pass(backend, requests, intervals, args, f"rate {rate_label(rate)}")
            passes.append(dict(request_rate=rate_label(rate), **summarize(records, duration, slos)))
    finally:
        await backend.close()
    workload_facts = {name: getattr(args, name) for name in (
        "dataset", "input_len", "output_len", "range_ratio", "token_ids", "chat", "ignore_eos", "temperature",
        "num_requests", "warmup_requests", "burstiness", "max_concurrency", "seed")}
    workload_facts.update(dataset_path=str(args.dataset_path) if args.dataset_path else None, goodput_slos_ms=slos)
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    server = dict(backend=backend.name, address=backend.endpoint, model=facts.model,
                  max_model_len=facts.max_model_len)
    return dict(machine=machine, server=server, workload=workload_facts, note=args.note, passes=passes)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    name = prog or "server.loadgen.load"
    try:
        result = asyncio.run(run(args))
    except ServerError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:  # a bad dataset file, unreadable TLS files, a server not ready
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    write_outputs(result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
