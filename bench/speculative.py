"""Speculative decoding in the engine: time per output token and throughput at several
concurrencies, with speculation off, n-gram, and a draft model, adaptive and fixed depth.

    python -m bench.speculative --out bench/results/speculative_gpu

runs the matrix that matters by default: copy and chat, c = 1, 4, 16, 64, speculation off, n-gram with
adaptive depth and n-gram at fixed depth (--modes adds the draft modes, MODES below).

Greedy, so every mode must produce the same tokens; the script checks that too. With
--draft-model equal to --model (the default), the draft agrees with the target on every
token: an upper bound on what a real draft achieves. The shipped-draft modes use the draft
shipped for the target (scheduler/speculative/drafts/), when there is one.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from scheduler import Engine, SamplingParams

CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    discount = 0
    if subtotal > 100:
        discount = subtotal * 0.05
    taxed = (subtotal - discount) * (1 + tax_rate)
    return round(taxed, 2)
'''
COPY_TASKS = [f"Rewrite this code with the variable `{old}` renamed to `{new}`. Output only the code.\n\n{CODE}"
              for old, new in [("subtotal", "running_sum"), ("discount", "rebate"), ("taxed", "final_amount"),
                               ("items", "cart")]]
CHAT_TASKS = ["Explain how a refrigerator keeps food cold.", "Write a short story about a lighthouse keeper.",
              "What are three tips for learning a new language?", "Describe the water cycle for a child."]
CODE_TASKS = ["Write a Python function that splits a CSV line into fields, keeping quoted commas inside a field.",
              "Write a Python class for a least-recently-used cache with get and put methods.",
              "Write a Python script that counts how often each word appears in a text file and prints the top ten.",
              "Write a Python function that walks a directory tree and returns the total size of its files."]

MODES = {  # name -> engine options
    "off": dict(speculative="off"),
    "ngram": dict(speculative="ngram"),
    "ngram-fixed-k": dict(speculative="ngram", adaptive_speculation=False),
    # The same, verified on the device inside the overlapped loop (speculative/loop.py).
    "ngram-loop": dict(speculative="ngram", speculation_in_loop=True),
    "ngram-fixed-k-loop": dict(speculative="ngram", adaptive_speculation=False, speculation_in_loop=True),
    "draft": dict(speculative="draft"),
    "draft-fixed-k": dict(speculative="draft", adaptive_speculation=False),
    # The draft shipped for the target (scheduler/speculative/drafts/), found by the target's fingerprint.
    "shipped-draft": dict(speculative="draft", draft_model=None),
    "shipped-draft-fixed-k": dict(speculative="draft", draft_model=None, adaptive_speculation=False),
    # An EAGLE head reading the target's hidden states (--eagle-head, else the one shipped for the target).
    "eagle": dict(speculative="eagle"),
    "eagle-fixed-k": dict(speculative="eagle", adaptive_speculation=False),
    # The same, drafted from the step in flight and verified on the device inside the overlapped loop.
    "eagle-loop": dict(speculative="eagle", speculation_in_loop=True),
    "eagle-fixed-k-loop": dict(speculative="eagle", adaptive_speculation=False, speculation_in_loop=True),
}


def run_load(engine: Engine, prompts: list[list[int]], concurrency: int, max_tokens: int) -> dict:
    """Keep `concurrency` requests in flight until every prompt is answered."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    pending, live, done = list(range(len(prompts))), {}, {}
    start = time.perf_counter()
    while pending or live:
        while pending and len(live) < concurrency:
            i = pending.pop(0)
            live[i] = engine.add_request(None, params, prompt_token_ids=prompts[i])
        engine.step()
        for i, stream in list(live.items()):
            while (delta := stream.get_nowait()) is not None:
                done.setdefault(i, []).append(delta)
            if stream.finished:
                del live[i]
    wall = time.perf_counter() - start
    outputs = [[t for d in done[i] for t in d.token_ids] for i in range(len(prompts))]
    finals = [done[i][-1].metrics for i in range(len(prompts))]
    tpot = [(m.e2e_s - m.ttft_s) / (len(o) - 1) for m, o in zip(finals, outputs) if len(o) > 1]
    drafted = sum(m.draft_tokens for m in finals)
    accepted = sum(m.accepted_tokens for m in finals)
    return {"concurrency": concurrency, "wall_s": wall, "output_tokens": sum(map(len, outputs)),
            "throughput_tok_s": sum(map(len, outputs)) / wall, "tpot_ms": 1000 * sum(tpot) / len(tpot),
            "draft_tokens": drafted, "acceptance": accepted / drafted if drafted else None, "outputs": outputs}


def make_engine(args, mode: str) -> Engine:
    options = dict(MODES[mode], num_speculative_tokens=args.k)
    if options["speculative"] == "eagle" and args.eagle_head:
        options["eagle_head"] = args.eagle_head
    if options["speculative"] == "draft" and "draft_model" not in options:
        options["draft_model"] = args.draft_model or args.model
    # Every mode's engine stays alive for the whole run, so each gets a fixed share of memory.
    return Engine(model=args.model, load_format=args.load_format, max_num_seqs=max(args.concurrency),
                  kv_cache_bytes=int(args.kv_cache_gib * 2**30), **options)


def bench_all(args, modes: list[str], workloads: dict[str, list[str]]) -> dict:
    """Every mode's engine is built first; then each setting runs `rounds` times, the modes taking
    turns within a round, so a machine that drifts (clocks, neighbours) shifts every mode alike. A
    setting's figures are the median round's (by time per token)."""
    engines = {mode: make_engine(args, mode) for mode in modes}
    results = {mode: {} for mode in modes}
    for name, tasks in workloads.items():
        prompts = [engines[modes[0]].inputs.render_chat([{"role": "user", "content": t}]) for t in tasks]
        for engine in engines.values():
            run_load(engine, prompts[:1], 1, 8)  # warm-up
        for c in args.concurrency:
            n = args.requests_per_concurrency * c
            batch = (prompts * (n // len(prompts) + 1))[:max(n, len(prompts))]
            runs = {mode: [] for mode in modes}
            for round_ in range(args.warmup_rounds + args.rounds):
                for mode, engine in engines.items():
                    r = run_load(engine, batch, c, args.output_len)
                    if round_ >= args.warmup_rounds:  # the first meet new shapes (allocator, cuBLAS)
                        runs[mode].append(r)
            for mode in modes:
                ordered = sorted(runs[mode], key=lambda r: r["tpot_ms"])
                r = dict(ordered[len(ordered) // 2], tpot_ms_rounds=[round(x["tpot_ms"], 3) for x in runs[mode]])
                results[mode].setdefault(name, []).append(r)
                print(f"{mode:22s} {name:5s} c={c:3d}  {r['tpot_ms']:7.2f} ms/token  {r['throughput_tok_s']:8.1f} tok/s"
                      f"  acceptance {r['acceptance'] if r['acceptance'] is None else round(r['acceptance'], 2)}"
                      f"  rounds {r['tpot_ms_rounds']}", flush=True)
    return results


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def write(results: dict, args, out: Path) -> None:
    off = results["off"]
    lines = [f"# Speculative decoding, {machine()}", "",
             f"{time.strftime('%Y-%m-%d')} · target {args.model} · draft {args.draft_model or args.model} · "
             f"k_max {args.k} · {args.output_len} output tokens, greedy · torch {torch.__version__}", "",
             "Time per output token (ms) and output throughput (tok/s) of the median of "
             f"{args.rounds} rounds after {args.warmup_rounds} untimed (the modes take turns within a round); "
             "speed-up per token against off in brackets.",
             ""]
    for workload in off:
        lines += [f"## {workload} workload", "", "| mode | " + " | ".join(f"c={r['concurrency']}" for r in
                                                                            off[workload]) + " |",
                  "|---|" + "---|" * len(off[workload])]
        for mode, per_workload in results.items():
            cells = []
            for r, base in zip(per_workload[workload], off[workload]):
                same = "" if r["outputs"] == base["outputs"] else " DIFFERENT OUTPUT"
                acc = f", acc {r['acceptance']:.2f}" if r["acceptance"] is not None else ""
                cells.append(f"{r['tpot_ms']:.2f} ms ({base['tpot_ms'] / r['tpot_ms']:.2f}x), "
                             f"{r['throughput_tok_s']:.0f} tok/s{acc}{same}")
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    for per_workload in results.values():
        for runs in per_workload.values():
            for r in runs:
                r.pop("outputs")
    out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "args": vars(args), "results": results},
                                                   indent=1, default=str))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--draft-model", default=None, help="default: the target itself (all drafts accepted)")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--eagle-head", default=None, help="the eagle modes' head (default: the one shipped)")
    parser.add_argument("--modes", default="off,ngram,ngram-fixed-k", help=f"of {', '.join(MODES)}; off first")
    parser.add_argument("--concurrency", default="1,4,16,64", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--requests-per-concurrency", type=int, default=2,
                        help="requests per setting: this many times the concurrency (at least one per prompt)")
    parser.add_argument("--workloads", default="copy,chat", help="of copy, chat, code")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each setting; the median is reported")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="untimed runs of each setting first")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0, help="KV cache of each mode's engine")
    parser.add_argument("--out", default="bench/results/speculative")
    args = parser.parse_args(argv)
    tasks = {"copy": COPY_TASKS, "chat": CHAT_TASKS, "code": CODE_TASKS}
    workloads = {name: tasks[name] for name in args.workloads.split(",")}
    modes = args.modes.split(",")
    assert modes[0] == "off", "the first mode is the baseline: off"
    results = bench_all(args, modes, workloads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write(results, args, out)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
