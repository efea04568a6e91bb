"""The host's cost of a grammar-constrained step, on the CPU: N JSON-schema requests against N unconstrained ones,
with a model whose forward costs next to nothing, broken down into what a grammar adds.

The engine drives bench/host_path.py's stand-in model (one layer of hidden size 8, forward = the embedding of
each new token), here with the default model's tokenizer and vocabulary so that the grammars and their masks are
the real ones (bench/structured.py's schemas). The model's time is measured apart and left out: what is reported is
the engine thread's CPU time (time.thread_time) per full-batch decode step, split into
- mask fill: the grammar matchers writing the step's token bitmask (TokenMasks), and with speculation the masks
  of every drafted position (the matchers walked through the drafts),
- mask apply: disallowed logits set to -inf (on a GPU a device op; on this CPU the host runs it),
- token accept: the matchers taking the step's tokens (Guide.accept), and with speculation settling the verified
  drafts (rejected ones rolled back),
- the rest: everything else of the step (scheduling, inputs, argmax, stop checks, outputs).
Work done on another thread (a fill overlapped with the engine thread) is reported apart, as is the whole
process's CPU time, so nothing is hidden by moving it.

With --speculative ngram, both workloads draft by n-gram lookup (fixed depth, --num-speculative-tokens): a step
is then a full-batch verification, and what a request gains a step (1 + its accepted drafts) is reported beside.

    python -m bench.structured_host [--num-requests 64,256] [--output-len 48] [--loops on,off] [--speculative ngram]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import threading
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

from bench.host_path import TINY, ModelClock
from bench.structured import schema
from scheduler import LLM, SamplingParams, StructuredOutputsParams
from scheduler.structured import guide
from server.loadgen import machine

# What each piece is, as the functions that do it: (module, class or None, function name); those of earlier
# versions too (TokenMasks._fill), so the benchmark measures them alike. Giving the matchers their tokens is part
# of the fill where the fill does it.
PIECES = {"mask_fill": [(guide, "TokenMasks", "_fill"), (guide, "TokenMasks", "fill"), (guide, "Guide", "fill_drafts"),
                        (guide, "TokenMasks", "fill_drafts")],
          "mask_apply": [(guide, None, "apply_token_bitmask")],
          "token_accept": [(guide, "Guide", "accept"), (guide, "Guide", "settle")]}


class PieceClock:
    """Wraps the functions of each piece, adding up their CPU time: on the engine thread, and on any other. A
    piece's function called inside another's (settle taking the next token by accept) counts once, in the outer."""

    def __init__(self):
        self.engine_thread = threading.get_ident()
        self.seconds = {name: 0.0 for name in PIECES}
        self.elsewhere = {name: 0.0 for name in PIECES}
        self._inside = threading.local()
        self._undo = []
        for name, places in PIECES.items():
            for module, cls, fn in places:
                owner = getattr(module, cls) if cls else module
                if hasattr(owner, fn):
                    original = getattr(owner, fn)
                    setattr(owner, fn, self._timed(name, original))
                    self._undo.append((owner, fn, original))

    def _timed(self, name: str, fn):
        def timed(*args, **kwargs):
            if getattr(self._inside, "piece", False):
                return fn(*args, **kwargs)
            self._inside.piece = True
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self._inside.piece = False
                spent = time.thread_time() - start
                if threading.get_ident() == self.engine_thread:
                    self.seconds[name] += spent
                else:
                    self.elsewhere[name] += spent
        return timed

    def restore(self) -> None:
        for owner, fn, original in reversed(self._undo):
            setattr(owner, fn, original)


def build(tokenizer, num_requests: int, output_len: int, prompt_len: int, overlap: bool, speculative: str = "off",
          num_speculative_tokens: int = 3) -> tuple[LLM, ModelClock]:
    max_model_len = prompt_len + output_len + 16 + num_speculative_tokens
    kv_bytes_per_token = 2 * TINY["hidden_size"] * 4
    config = LlamaConfig(**{**TINY, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id},
                         max_position_embeddings=max_model_len)
    llm = LLM(model=config, tokenizer="default", load_format="dummy", device="cpu", dtype="float32",
              max_num_seqs=num_requests, max_num_batched_tokens=max(4096, num_requests * 2),
              max_model_len=max_model_len, overlap_scheduling=overlap, speculative=speculative,
              num_speculative_tokens=num_speculative_tokens, adaptive_speculation=False,
              kv_cache_bytes=(num_requests + 1) * (max_model_len + 16) * kv_bytes_per_token)
    return llm, ModelClock(llm.engine.model, real=False)


def run(llm: LLM, clock: ModelClock, prompt: list[int], params: list[SamplingParams]) -> dict:
    """Every request at once; the full-batch decode steps timed one by one."""
    engine, n = llm.engine, len(params)
    streams = [engine.add_request(None, p, prompt_token_ids=prompt) for p in params]
    pieces = PieceClock()
    host, per_piece, elsewhere, process, wall, gained = [], {k: [] for k in PIECES}, [], [], [], []
    try:
        while not all(s.finished for s in streams):
            before = (clock.seconds, dict(pieces.seconds), sum(pieces.elsewhere.values()))
            cpu, proc, start = time.thread_time(), time.process_time(), time.perf_counter()
            engine.step()
            spent = time.thread_time() - cpu - (clock.seconds - before[0])
            stats = engine.last_step_stats
            for s in streams:
                while s.get_nowait() is not None:
                    pass
            if stats.num_prompt_tokens or stats.num_running != n or stats.num_generation_tokens < n:
                continue  # ramp-up and tail: not a full-batch decode step (with drafts, tokens >= n)
            gained.append(stats.num_generation_tokens / n)
            host.append(spent)
            process.append(time.process_time() - proc - (clock.seconds - before[0]))
            wall.append(time.perf_counter() - start)
            for name in PIECES:
                per_piece[name].append(pieces.seconds[name] - before[1][name])
            elsewhere.append(sum(pieces.elsewhere.values()) - before[2])
    finally:
        pieces.restore()
    if not host:
        raise RuntimeError("no full-batch decode step: raise --output-len")

    def us_per_row(values):  # median over the steps, per request
        return round(1e6 * statistics.median(values) / n, 2)

    pieces_us = {name: us_per_row(values) for name, values in per_piece.items()}
    return dict(steps=len(host), host_ms_per_step=dict(median=round(1e3 * statistics.median(host), 3),
                                                       mean=round(1e3 * statistics.mean(host), 3)),
                host_us_per_row=us_per_row(host), pieces_us_per_row=pieces_us,
                rest_us_per_row=round(us_per_row(host) - sum(pieces_us.values()), 2),
                other_threads_us_per_row=us_per_row(elsewhere), process_cpu_us_per_row=us_per_row(process),
                wall_ms_per_step=round(1e3 * statistics.median(wall), 3),
                tokens_per_row_step=round(statistics.mean(gained), 3))


def measure(args: argparse.Namespace, tokenizer, num_requests: int, overlap: bool) -> dict:
    llm, clock = build(tokenizer, num_requests, args.output_len, 64, overlap, args.speculative,
                       args.num_speculative_tokens)
    prompt = llm.engine.inputs.render_chat([{"role": "user", "content": "List some records as JSON."}])
    rng = random.Random(args.seed)
    schemas = [StructuredOutputsParams(json=schema(rng, min_items=args.output_len)) for _ in range(num_requests)]
    for so in schemas:
        llm.engine.grammars.submit(so).result()
    run(llm, clock, prompt, [SamplingParams(temperature=0, max_tokens=4, structured_outputs=so)
                             for so in schemas[:2]])  # warm-up
    workloads = {
        "unconstrained_greedy": [SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
                                 for _ in range(num_requests)],
        "json_schema_greedy": [SamplingParams(temperature=0, max_tokens=args.output_len, structured_outputs=so)
                               for so in schemas],
    }
    results = {}
    for _ in range(args.repeats):  # alternated, the best median of each kept: the machine is shared
        for name, params in workloads.items():
            r = run(llm, clock, prompt, params)
            if name not in results or r["host_us_per_row"] < results[name]["host_us_per_row"]:
                results[name] = r
    base, constrained = results["unconstrained_greedy"], results["json_schema_greedy"]
    extra = round(constrained["host_us_per_row"] - base["host_us_per_row"], 2)
    extra_no_apply = round(extra - constrained["pieces_us_per_row"]["mask_apply"]
                           + base["pieces_us_per_row"]["mask_apply"], 2)
    return dict(num_requests=num_requests, loop="on" if overlap else "off", speculative=args.speculative,
                results=results,
                constrained_minus_unconstrained_us_per_row=extra,
                constrained_minus_unconstrained_without_apply_us_per_row=extra_no_apply,
                constrained_over_unconstrained_host=round(constrained["host_us_per_row"] / base["host_us_per_row"], 3))


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# Host cost of a grammar-constrained step (CPU, stand-in model)", "",
             f"`{report['command']}` · {m['date']} · {m['cpu']} ({m['logical_cores']} cores, load "
             f"{m['load_average_at_start']}) · torch {m['torch']}, xgrammar {m['xgrammar']}", "",
             "Engine-thread CPU µs per request per full-batch decode step (median of the steps), the model's time "
             "left out.", "",
             "| requests | loop | speculative | workload | host µs/row | mask fill | mask apply | token accept | rest "
             "| other threads | process CPU µs/row | tokens/row/step |",
             "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in report["measurements"]:
        for name, r in m["results"].items():
            p = r["pieces_us_per_row"]
            lines.append(f"| {m['num_requests']} | {m['loop']} | {m.get('speculative', 'off')} | {name} | "
                         f"{r['host_us_per_row']} | {p['mask_fill']} | {p['mask_apply']} | {p['token_accept']} | "
                         f"{r['rest_us_per_row']} | {r['other_threads_us_per_row']} | "
                         f"{r['process_cpu_us_per_row']} | {r.get('tokens_per_row_step', 1.0)} |")
    lines += ["", "| requests | loop | constrained − unconstrained µs/row | same without the mask apply (device work "
              "on a GPU) | constrained / unconstrained host |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {m['num_requests']} | {m['loop']} | {m['constrained_minus_unconstrained_us_per_row']} | "
              f"{m['constrained_minus_unconstrained_without_apply_us_per_row']} | "
              f"{m['constrained_over_unconstrained_host']} |" for m in report["measurements"]]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", default="64,256", help="running requests, comma-separated")
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--loops", default="on", help="overlapped loop: on, off or on,off")
    p.add_argument("--repeats", type=int, default=2, help="runs of each workload, alternated; the best kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", default="off", choices=("off", "ngram"), help="drafts for both workloads")
    p.add_argument("--num-speculative-tokens", type=int, default=3, help="n-gram depth (fixed)")
    p.add_argument("--out", type=Path, default=Path("bench/results/structured_host_cpu_latest.json"))
    args = p.parse_args(argv)
    args.num_requests = [int(n) for n in args.num_requests.split(",")]
    args.loops = args.loops.split(",")
    if any(n < 1 for n in args.num_requests) or args.output_len < 4 or args.repeats < 1 \
            or args.num_speculative_tokens < 1:
        p.error("--num-requests >= 1 each, --output-len >= 4, --repeats >= 1, --num-speculative-tokens >= 1")
    if any(loop not in ("on", "off") for loop in args.loops):
        p.error(f"--loops takes on, off or on,off; got {','.join(args.loops)}")
    return args


def main(argv=None) -> dict:
    import sys
    from importlib.metadata import version

    from scheduler.worker.models import load_tokenizer

    args = parse_args(argv)
    torch.set_num_threads(1)
    tokenizer = load_tokenizer("default")
    report = dict(command="python -m bench.structured_host " + " ".join(sys.argv[1:] if argv is None else argv),
                  machine=machine.machine_facts(python=platform.python_version(), torch=torch.__version__,
                                                xgrammar=version("xgrammar")),
                  output_len=args.output_len, measurements=[])
    for n in args.num_requests:
        for loop in args.loops:
            report["measurements"].append(measure(args, tokenizer, n, loop == "on"))
            m = report["measurements"][-1]
            print(f"{n} requests, loop {loop}: constrained - unconstrained "
                  f"{m['constrained_minus_unconstrained_us_per_row']} host µs/row", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(report))
    print(to_markdown(report))
    return report


if __name__ == "__main__":
    main()
