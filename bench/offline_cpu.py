"""Offline throughput on CPU: HF generate() in static batches, HF generate_batch() (continuous
batching) and our engine, on the same greedy requests, in one process.

    python -m bench.offline_cpu [--num-requests 32 --min-prompt 32 --max-prompt 256 --output-len 64]
"""

from __future__ import annotations

import argparse
import platform

import torch
import transformers
from transformers import AutoModelForCausalLM

from bench.offline_common import (
    ENGINE,
    HF_CONTINUOUS,
    HF_STATIC,
    Prompts,
    add_workload_args,
    check_positive,
    engine,
    hf_continuous,
    hf_static,
    make_prompts,
    measure,
    speedups,
    write_results,
)
from scheduler import LLM
from scheduler.worker.models import default_model_file
from server.loadgen import machine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p, num_requests=32, min_prompt=32, max_prompt=256, output_len=64,
                      out="bench/results/offline_cpu.json")
    p.add_argument("--hf-batch-size", type=int, default=8, help="static batch size of HF generate()")
    p.add_argument("--max-batched-tokens", type=int, default=2048,
                   help="token budget of one step, for both continuous batchers")
    args = p.parse_args(argv)
    check_positive(p, args, ("hf_batch_size", "max_batched_tokens"))
    return args


# --- the three systems ---------------------------------------------------------------------------------------------

def load_hf_model():
    path = default_model_file()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


# --- measuring -----------------------------------------------------------------------------------------------------

def greedy_agreement(ours: Prompts, reference: Prompts) -> dict:
    identical = sum(a == b for a, b in zip(ours, reference))
    matched = sum(common_prefix(a, b) for a, b in zip(ours, reference))
    return dict(identical_fraction=identical / len(reference), identical=identical, requests=len(reference),
                matching_prefix_fraction=matched / sum(len(r) for r in reference))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def machine_facts() -> dict:
    return machine.machine_facts(torch_threads=torch.get_num_threads(), python=platform.python_version(),
                                 torch=torch.__version__, transformers=transformers.__version__)


def to_markdown(result: dict) -> str:
    m, w = result["machine"], result["workload"]
    lines = [
        "# Offline throughput on CPU",
        "",
        f"{m['date']} · {m['cpu']} · {m['logical_cores']} cores ({m['torch_threads']} torch threads) · "
        f"torch {m['torch']} · transformers {m['transformers']} · load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}",
        "",
        f"{w['num_requests']} requests, prompts {w['min_prompt']}–{w['max_prompt']} random token ids "
        f"(seed {w['seed']}, {w['prompt_tokens']} in all), {w['output_len']} output tokens each, greedy, EOS ignored; "
        f"HF static batch size {w['hf_batch_size']}; step budget {w['max_batched_tokens']} tokens.",
        "",
        "| system | wall s | output tok/s | total tok/s | beastserve speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["systems"]:
        speedup = result["speedup"].get(r["system"])
        cell = f"{speedup:.2f}x" if speedup is not None else "—"
        lines.append(f"| {r['system']} | {r['seconds']:.1f} | {r['output_tok_s']:.1f} | {r['total_tok_s']:.1f} | "
                     f"{cell} |")
    for name, agreement in result["greedy_match"].items():
        lines += ["", f"Greedy outputs of {name} identical to HF generate(): {agreement['identical']}/"
                      f"{agreement['requests']} requests ({agreement['matching_prefix_fraction']:.1%} of tokens "
                      "before the first difference)."]
    return "\n".join(lines) + "\n"


# --- main ----------------------------------------------------------------------------------------------------------

def run_systems(args: argparse.Namespace, prompts: Prompts, llm: LLM) -> tuple[list[dict], dict]:
    rows, outputs = [], {}
    systems = [] if args.skip_hf else [(HF_STATIC, hf_static, args.hf_batch_size),
                                       (HF_CONTINUOUS, hf_continuous, args.max_batched_tokens)]
    model = None if args.skip_hf else load_hf_model()
    for name, make, option in systems:
        row, outputs[name] = measure(name, make(model, option), prompts, args.output_len)
        rows.append(row)
    row, outputs[ENGINE] = measure(ENGINE, engine(llm), prompts, args.output_len)
    rows.append(row)
    agreement = {} if args.skip_hf else {name: greedy_agreement(outputs[name], outputs[HF_STATIC])
                                         for name in (ENGINE, HF_CONTINUOUS)}
    return rows, agreement


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()  # NO_EOS draws a warning per generate() call
    transformers.logging.disable_progress_bar()
    machine = machine_facts()
    llm = LLM(model="default", device="cpu", dtype="float32", max_num_batched_tokens=args.max_batched_tokens)
    prompts = make_prompts(llm.engine.inputs.vocab_size, args.num_requests, args.min_prompt, args.max_prompt,
                           args.seed)
    rows, agreement = run_systems(args, prompts, llm)
    workload = dict(num_requests=args.num_requests, min_prompt=args.min_prompt, max_prompt=args.max_prompt,
                    prompt_tokens=sum(len(p) for p in prompts), output_len=args.output_len,
                    hf_batch_size=args.hf_batch_size, max_batched_tokens=args.max_batched_tokens, seed=args.seed)
    result = dict(machine=machine, workload=workload, systems=rows, speedup=speedups(rows), greedy_match=agreement)
    print("\n" + to_markdown(result))
    write_results(result, args.out, to_markdown)
    return result


if __name__ == "__main__":
    main()
