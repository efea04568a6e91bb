"""Offline throughput on CPU: HF generate() in static batches, HF generate_batch() (continuous
batching) and our engine, on the same greedy requests, in one process.

    python -m bench.offline_cpu [--num-requests 32 --min-prompt 32 --max-prompt 256 --output-len 64]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

from bench import machine
from scheduler import LLM, SamplingParams
from scheduler.models import default_model_file

Prompts = list[list[int]]
Generate = Callable[[Prompts, int], Prompts]  # (prompts, output_len) -> output token ids per prompt

NO_EOS = -1  # an id no token has: neither HF path stops early, and no logit is masked
WARMUP_REQUESTS = 2
WARMUP_OUTPUT_LEN = 4
CB_PAGE_SIZE = 256  # generate_batch's default page size, in tokens
HF_STATIC, HF_CONTINUOUS, ENGINE = "HF generate() static batches", "HF generate_batch() continuous", "beastserve LLM"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--min-prompt", type=int, default=32, help="shortest prompt, in tokens")
    p.add_argument("--max-prompt", type=int, default=256, help="longest prompt, in tokens")
    p.add_argument("--output-len", type=int, default=64, help="tokens generated per request (EOS ignored)")
    p.add_argument("--hf-batch-size", type=int, default=8, help="static batch size of HF generate()")
    p.add_argument("--max-batched-tokens", type=int, default=2048,
                   help="token budget of one step, for both continuous batchers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-hf", action="store_true", help="time our engine only (no parity check)")
    p.add_argument("--out", type=Path, default=Path("bench/results/offline_cpu.json"),
                   help="JSON results; the markdown goes next to it with a .md suffix")
    args = p.parse_args(argv)
    for name in ("num_requests", "min_prompt", "output_len", "hf_batch_size", "max_batched_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_prompt < args.min_prompt:
        p.error(f"--max-prompt must be >= --min-prompt ({args.min_prompt}), got {args.max_prompt}")
    return args


def make_prompts(vocab_size: int, num_requests: int, min_len: int, max_len: int, seed: int) -> Prompts:
    rng = random.Random(seed)
    lengths = [rng.randint(min_len, max_len) for _ in range(num_requests)]
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths]


# --- the three systems ---------------------------------------------------------------------------------------------

def load_hf_model():
    path = default_model_file()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def greedy_config(output_len: int) -> GenerationConfig:
    return GenerationConfig(do_sample=False, max_new_tokens=output_len, eos_token_id=NO_EOS, pad_token_id=0)


def left_pad(prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


def hf_static(model, batch_size: int) -> Generate:
    """Batches in arrival order, as a naive server would; each waits for its longest member."""
    @torch.inference_mode()
    def generate(prompts: Prompts, output_len: int) -> Prompts:
        outputs = []
        for start in range(0, len(prompts), batch_size):
            input_ids, attention_mask = left_pad(prompts[start:start + batch_size])
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                 generation_config=greedy_config(output_len))
            outputs += out[:, input_ids.shape[1]:].tolist()
        return outputs
    return generate


def hf_continuous(model, max_batched_tokens: int) -> Generate:
    def generate(prompts: Prompts, output_len: int) -> Prompts:
        # On CPU the cache would otherwise be sized from free RAM; give it exactly what the requests need.
        needed = sum(len(p) + output_len for p in prompts)
        cb_config = ContinuousBatchingConfig(page_size=CB_PAGE_SIZE, max_batch_tokens=max_batched_tokens,
                                             num_blocks=math.ceil(needed / CB_PAGE_SIZE) + len(prompts))
        results = model.generate_batch(prompts, generation_config=greedy_config(output_len),
                                       continuous_batching_config=cb_config, progress_bar=False)
        outputs = list(results.values())  # ordered like the inputs
        assert len(outputs) == len(prompts) and all(o.error is None for o in outputs), "generate_batch lost requests"
        return [o.generated_tokens for o in outputs]
    return generate


def engine(llm: LLM) -> Generate:
    def generate(prompts: Prompts, output_len: int) -> Prompts:
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        return [o.token_ids for o in llm.generate(prompts, params)]
    return generate


# --- measuring -----------------------------------------------------------------------------------------------------

def measure(name: str, generate: Generate, prompts: Prompts, output_len: int) -> tuple[dict, Prompts]:
    generate(prompts[:WARMUP_REQUESTS], WARMUP_OUTPUT_LEN)
    start = time.perf_counter()
    outputs = generate(prompts, output_len)
    seconds = time.perf_counter() - start
    num_output = sum(len(o) for o in outputs)
    num_total = num_output + sum(len(p) for p in prompts)
    row = dict(system=name, seconds=seconds, output_tokens=num_output, total_tokens=num_total,
               output_tok_s=num_output / seconds, total_tok_s=num_total / seconds)
    print(f"{name}: {seconds:.1f} s, {row['output_tok_s']:.1f} output tok/s", flush=True)
    return row, outputs


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


def speedups(rows: list[dict]) -> dict[str, float]:
    ours = next(r for r in rows if r["system"] == ENGINE)
    return {r["system"]: ours["output_tok_s"] / r["output_tok_s"] for r in rows if r is not ours}


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


def write_results(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")


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
    write_results(result, args.out)
    return result


if __name__ == "__main__":
    main()
