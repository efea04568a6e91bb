"""Host cost of n-gram speculation per step and per token, on the CPU, with a model whose forward costs next to
nothing (bench.host_path's stand-in: the embedding of each new token, tied to the logits).

Two workloads: copy, where the stand-in's next token is a function of the token alone, so every sequence falls into
a loop at once and the lookup's drafts are accepted; chat, where it is a function of the token and its position, so
the lookup finds few drafts and fewer are accepted (the adaptive depth must stop drafting, and cheaply). Modes: off,
n-gram with adaptive depth, n-gram at fixed depth; overlapped loop on (the default). Each setting keeps c requests in
flight; steps after the first c admissions are timed. Host time is the engine thread's CPU time less the model's
(bench.host_path.ModelClock). On the CPU the lookup and verification run on the host too: a GPU would launch them
(tens of kernels a step) and run them itself, so these figures bound the host's share from above.

    PYTHONPATH=. python3 -m bench.spec_loop [--concurrency 1,4,16,64] [--out bench/results/spec_loop_cpu.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

from bench.host_path import TINY, ModelClock
from bench.offline_common import make_prompts, write_results
from scheduler import LLM, SamplingParams
from server.loadgen import machine

MODES = {"off": dict(speculative="off"), "ngram": dict(speculative="ngram"),
         "ngram-fixed-k": dict(speculative="ngram", adaptive_speculation=False),
         "ngram-sync": dict(speculative="ngram", speculation_in_loop=False),
         "ngram-fixed-k-sync": dict(speculative="ngram", adaptive_speculation=False, speculation_in_loop=False)}


def build(mode: str, workload: str, concurrency: int, args) -> tuple[LLM, ModelClock]:
    max_model_len = args.max_prompt + args.output_len + 16
    llm = LLM(model=LlamaConfig(**TINY, max_position_embeddings=max_model_len), load_format="dummy", device="cpu",
              dtype="float32", max_num_seqs=max(concurrency, 1), max_model_len=max_model_len,
              num_speculative_tokens=args.k, kv_cache_bytes=(concurrency + 1) * (max_model_len + 32) * 64,
              **MODES[mode])
    model = llm.engine.model
    clock = ModelClock(model, real=False)
    if workload == "chat":  # the next token hangs on the position too: no loop for the lookup to find
        embed, vocab = model.model.embed_tokens, TINY["vocab_size"]
        model.forward = clock._timed(lambda ids, positions, kv, meta: embed((ids * 31 + positions * 17) % vocab))
    return llm, clock


def run(mode: str, workload: str, concurrency: int, args) -> dict:
    llm, clock = build(mode, workload, concurrency, args)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    pending = make_prompts(TINY["vocab_size"], args.requests_per_concurrency * concurrency, args.min_prompt,
                           args.max_prompt, args.seed)
    live, host, steps, tokens, wall = [], 0.0, 0, 0, 0.0
    drafted = accepted = 0
    while pending or live:
        while pending and len(live) < concurrency:
            live.append(engine.add_request(None, params, prompt_token_ids=pending.pop(0)))
        model_before, cpu, started = clock.seconds, time.thread_time(), time.perf_counter()
        engine.step()
        stats = engine.last_step_stats
        if stats.num_prompt_tokens == 0 and stats.num_generation_tokens:  # decode steps
            host += time.thread_time() - cpu - (clock.seconds - model_before)
            wall += time.perf_counter() - started
            steps += 1
            tokens += stats.num_generation_tokens
            drafted += stats.num_draft_tokens
            accepted += sum(stats.accepted_per_position)
        for stream in live:
            while stream.get_nowait() is not None:
                pass
        live = [s for s in live if not s.finished]
    return dict(mode=mode, workload=workload, concurrency=concurrency, steps=steps,
                host_ms_per_step=1e3 * host / steps, tokens_per_step=tokens / steps,
                host_us_per_token=1e6 * host / tokens, wall_ms_per_step=1e3 * wall / steps,
                acceptance=accepted / drafted if drafted else None)


def to_markdown(result: dict) -> str:
    m, a = result["machine"], result["args"]
    lines = ["# n-gram speculation: host cost per step and per token (CPU, near-free model)", "",
             f"{m['date']} · {m['cpu']} ({m['logical_cores']} cores, load {m['load_average_at_start']}) · torch "
             f"{m['torch']} · k_max {a['k']} · {a['output_len']} output tokens · overlapped loop on", "",
             f"Median of {a['repeats']} runs. Host = the engine thread's CPU time less the model's; decode steps only.",
             "",
             "| workload | c | mode | host ms/step | tokens/step | host µs/token | vs off (µs/token) | acceptance |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    rows = result["results"]
    for r in rows:
        off = next(o for o in rows if o["mode"] == "off" and o["workload"] == r["workload"]
                   and o["concurrency"] == r["concurrency"])
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        lines.append(f"| {r['workload']} | {r['concurrency']} | {r['mode']} | {r['host_ms_per_step']:.3f} | "
                     f"{r['tokens_per_step']:.2f} | {r['host_us_per_token']:.1f} | "
                     f"{off['host_us_per_token'] / r['host_us_per_token']:.2f}x | {acc} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,4,16,64", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--modes", default=",".join(MODES), type=lambda s: s.split(","))
    p.add_argument("--workloads", default="copy,chat", type=lambda s: s.split(","))
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--min-prompt", type=int, default=32)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--requests-per-concurrency", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs of each setting; the median (by host ms/token)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/spec_loop_cpu_latest.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    facts = machine.machine_facts(python=platform.python_version(), torch=torch.__version__)
    result = dict(machine=facts, args={k: v for k, v in vars(args).items() if k != "out"}, results=[])
    for workload in args.workloads:
        for c in args.concurrency:
            for mode in args.modes:
                runs = sorted((run(mode, workload, c, args) for _ in range(args.repeats)),
                              key=lambda r: r["host_us_per_token"])
                r = runs[len(runs) // 2]
                result["results"].append(r)
                print(f"{workload} c={c} {mode}: {r['host_ms_per_step']:.3f} host ms/step, "
                      f"{r['tokens_per_step']:.2f} tokens/step, {r['host_us_per_token']:.1f} host µs/token "
                      f"(median of {statistics.median(x['host_us_per_token'] for x in runs):.1f})", flush=True)
    write_results(result, args.out, to_markdown)
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
