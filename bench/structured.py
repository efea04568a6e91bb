"""Step time of structured output: N concurrent JSON-schema requests against N unconstrained ones.

    python -m bench.structured [--device cpu --num-requests 64 --output-len 32]

Every JSON request has its own schema (an array of at least --output-len objects, so no request ends before
the others); the unconstrained requests ignore EOS. Each workload runs as one batch through the engine, and the
figure compared is the median time of the steps in which every request decodes (no prompt chunk in the step).
A third workload, unconstrained but sampled (temperature 1), separates the cost of leaving the greedy argmax
path from the cost of the grammar masks themselves.

With --speculative the same workloads run with speculation on (drafts verified under the grammars' masks);
steps then carry a varying number of tokens each, so the figure to compare is the time per output token.

bench/structured_host.py is its CPU mode for the host's share alone: the same schemas over a model whose forward
costs nothing, the engine thread's CPU time per row split into mask fill, mask apply, token accept and the rest.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from scheduler import LLM, SamplingParams, StructuredOutputsParams
from server.loadgen import machine

FIELDS = ["name", "city", "color", "size", "score", "owner", "active", "level", "kind", "id"]


def schema(rng: random.Random, min_items: int) -> dict:
    properties = {}
    for key in rng.sample(FIELDS, rng.randint(2, 4)):
        properties[key] = rng.choice([
            {"type": "integer", "minimum": 0, "maximum": rng.choice([9, 999])}, {"type": "boolean"},
            {"enum": rng.sample(["red", "green", "blue", "small", "large"], 3)},
            {"type": "string", "maxLength": rng.choice([4, 8])}])
    item = {"type": "object", "properties": properties, "required": list(properties)}
    return {"type": "array", "items": item, "minItems": min_items}


def run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> dict:
    engine = llm.engine
    streams = [engine.add_request(None, p, prompt_token_ids=ids) for ids, p in zip(prompts, params)]
    decode_steps, start, steps = [], time.perf_counter(), 0
    while not all(s.finished for s in streams):
        engine.step()
        steps += 1
        stats = engine.last_step_stats
        if stats.num_prompt_tokens == 0 and stats.num_running == len(streams):
            decode_steps.append(stats.step_s)
    wall = time.perf_counter() - start
    tokens = drafted = accepted = 0
    for s in streams:
        while (delta := s.get_nowait()) is not None:
            tokens += len(delta.token_ids)
            if delta.finished:
                drafted += delta.metrics.draft_tokens
                accepted += delta.metrics.accepted_tokens
    return {"wall_s": round(wall, 3), "steps": steps, "output_tokens": tokens, "draft_tokens": drafted,
            "accepted_draft_tokens": accepted,
            "full_batch_decode_steps": len(decode_steps), "ms_per_output_token": round(1000 * wall / tokens, 3),
            "median_step_ms": round(1000 * statistics.median(decode_steps), 2) if decode_steps else None}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="the model (default: default); a directory with a config and "
                   "a tokenizer runs with --load-format dummy where its weights are not at hand")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"], help="dummy: random weights of the "
                   "model's shape (step time does not depend on their values; the grammar keeps outputs valid)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", default="off", help="a speculation method (ngram, draft; default off)")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--no-adaptive-speculation", action="store_true", help="draft --num-speculative-tokens "
                   "every step (else the engine chooses the depth, and may draft nothing for a full batch)")
    p.add_argument("--out", default=None, help="default: bench/results/structured_<device>.json (and .md)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    facts = machine.machine_facts(torch=torch.__version__)
    llm = LLM(args.model, load_format=args.load_format, device=args.device, dtype=args.dtype,
              max_num_seqs=max(args.num_requests, 1), max_num_batched_tokens=4096, speculative=args.speculative,
              num_speculative_tokens=args.num_speculative_tokens, adaptive_speculation=not args.no_adaptive_speculation)
    rng = random.Random(args.seed)
    prompt = llm.engine.inputs.render_chat([{"role": "user", "content": "List some records as JSON."}])
    prompts = [prompt] * args.num_requests
    n, length = args.num_requests, args.output_len
    schemas = [StructuredOutputsParams(json=schema(rng, min_items=length)) for _ in range(n)]
    compile_start = time.perf_counter()
    for so in schemas:
        llm.engine.grammars.submit(so).result()
    compile_s = time.perf_counter() - compile_start
    run(llm, prompts[:2], [SamplingParams(temperature=0, max_tokens=4)] * 2)  # warm-up
    workloads = {
        "unconstrained_greedy": [SamplingParams(temperature=0, max_tokens=length, ignore_eos=True)] * n,
        "unconstrained_sampled": [SamplingParams(temperature=1.0, seed=i, max_tokens=length, ignore_eos=True)
                                  for i in range(n)],
        "json_schema_greedy": [SamplingParams(temperature=0, max_tokens=length, structured_outputs=so)
                               for so in schemas],
    }
    results = {name: run(llm, prompts, params) for name, params in workloads.items()}
    base = results["unconstrained_greedy"]["median_step_ms"]
    constrained = results["json_schema_greedy"]["median_step_ms"]
    report = {
        "device": str(llm.engine.device), "model": args.model, "load_format": args.load_format,
        "dtype": str(llm.engine.dtype), "num_requests": n, "output_len": length, "speculative": args.speculative,
        "compile_s_all_schemas": round(compile_s, 3), "results": results,
        "json_over_unconstrained_step": round(constrained / base, 3) if base and constrained else None,
        **facts,
    }
    out = Path(args.out or f"bench/results/structured_{llm.engine.device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    rows = [f"| {name} | {r['median_step_ms']} | {r['full_batch_decode_steps']} | {r['output_tokens']} | "
            f"{r['wall_s']} | {r['ms_per_output_token']} | {r['accepted_draft_tokens']}/{r['draft_tokens']} |"
            for name, r in results.items()]
    speculation = "" if args.speculative == "off" else f", speculative={args.speculative} (up to " \
        f"{args.num_speculative_tokens} drafts{'' if args.no_adaptive_speculation else ', adaptive'})"
    out.with_suffix(".md").write_text("\n".join([
        f"# Structured output step time ({report['device']}, {n} concurrent requests, {length} tokens each"
        f"{speculation})", "",
        "| workload | median full-batch decode step (ms) | such steps | output tokens | wall (s) | ms per output token "
        "| drafts accepted/made |", "|---|---|---|---|---|---|---|", *rows, "",
        f"JSON-schema step / unconstrained greedy step: {report['json_over_unconstrained_step']}. "
        f"Compiling all {n} schemas (one thread, before the run): {report['compile_s_all_schemas']} s. "
        f"{facts['cpu']}, {facts['logical_cores']} cores, load average at start {facts['load_average_at_start']}.",
        ""]))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
