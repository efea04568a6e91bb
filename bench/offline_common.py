"""What the offline benchmarks share: the workload, the three systems (HF generate() in static batches, HF
generate_batch() continuous batching, our LLM) as functions from prompts to output token ids, and timing them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from scheduler import LLM, SamplingParams

Prompts = list[list[int]]


class Run(NamedTuple):
    outputs: Prompts  # output token ids per prompt
    queued_at: float | None = None  # perf_counter() when the requests were queued, where setup came first


Generate = Callable[[Prompts, int], Run]  # (prompts, output_len) -> run

NO_EOS = -1  # an id no token has: neither HF path stops early, and no logit is masked
WARMUP_REQUESTS = 2
WARMUP_OUTPUT_LEN = 4
CB_PAGE_SIZE = 256  # generate_batch's default page size, in tokens
# Named block_size up to transformers 5.17, page_size after.
CB_PAGE_FIELD = next(f.name for f in dataclasses.fields(ContinuousBatchingConfig) if f.name in ("page_size",
                                                                                                "block_size"))
HF_STATIC, HF_CONTINUOUS, ENGINE = "HF generate() static batches", "HF generate_batch() continuous", "beastserve LLM"


def add_workload_args(p: argparse.ArgumentParser, num_requests: int, min_prompt: int, max_prompt: int,
                      output_len: int, out: str) -> None:
    p.add_argument("--num-requests", type=int, default=num_requests)
    p.add_argument("--min-prompt", type=int, default=min_prompt, help="shortest prompt, in tokens")
    p.add_argument("--max-prompt", type=int, default=max_prompt, help="longest prompt, in tokens")
    p.add_argument("--output-len", type=int, default=output_len, help="tokens generated per request (EOS ignored)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-hf", action="store_true", help="time our engine only")
    p.add_argument("--out", type=Path, default=Path(out),
                   help="JSON results; the markdown goes next to it with a .md suffix")


def check_positive(p: argparse.ArgumentParser, args: argparse.Namespace, names: tuple[str, ...]) -> None:
    for name in ("num_requests", "min_prompt", "output_len", *names):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_prompt < args.min_prompt:
        p.error(f"--max-prompt must be >= --min-prompt ({args.min_prompt}), got {args.max_prompt}")


def make_prompts(vocab_size: int, num_requests: int, min_len: int, max_len: int, seed: int) -> Prompts:
    rng = random.Random(seed)
    lengths = [rng.randint(min_len, max_len) for _ in range(num_requests)]
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths]


# --- the three systems ---------------------------------------------------------------------------------------------

def greedy_config(output_len: int) -> GenerationConfig:
    return GenerationConfig(do_sample=False, max_new_tokens=output_len, eos_token_id=NO_EOS, pad_token_id=0)


def left_pad(prompts: Prompts, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids.to(device), attention_mask.to(device)


def hf_static(model, batch_size: int) -> Generate:
    """Batches in arrival order, as a naive server would; each waits for its longest member."""
    @torch.inference_mode()
    def generate(prompts: Prompts, output_len: int) -> Run:
        outputs = []
        for start in range(0, len(prompts), batch_size):
            input_ids, attention_mask = left_pad(prompts[start:start + batch_size], model.device)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                 generation_config=greedy_config(output_len))
            outputs += out[:, input_ids.shape[1]:].tolist()
        return Run(outputs)
    return generate


def hf_continuous(model, max_batched_tokens: int | None) -> Generate:
    """On CPU the cache is sized to what the requests need (it would otherwise be sized from free RAM); on a GPU
    generate_batch sizes it from free memory, and a step budget of None lets it choose that too."""
    def generate(prompts: Prompts, output_len: int) -> Run:
        cache = {}
        if model.device.type == "cpu":
            needed = sum(len(p) + output_len for p in prompts)
            cache = {CB_PAGE_FIELD: CB_PAGE_SIZE, "num_blocks": math.ceil(needed / CB_PAGE_SIZE) + len(prompts)}
        cb_config = ContinuousBatchingConfig(max_batch_tokens=max_batched_tokens, **cache)
        results = model.generate_batch(prompts, generation_config=greedy_config(output_len),
                                       continuous_batching_config=cb_config, progress_bar=False)
        outputs = list(results.values())  # ordered like the inputs
        assert len(outputs) == len(prompts) and all(o.error is None for o in outputs), "generate_batch lost requests"
        # Each call builds its manager and cache (and on a GPU captures CUDA graphs) before queueing anything.
        queued_at = min((o.created_time for o in outputs if getattr(o, "created_time", None)), default=None)
        return Run([o.generated_tokens for o in outputs], queued_at)
    return generate


def engine(llm: LLM) -> Generate:
    def generate(prompts: Prompts, output_len: int) -> Run:
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        return Run([o.token_ids for o in llm.generate(prompts, params)])
    return generate


# --- measuring -----------------------------------------------------------------------------------------------------

def measure(name: str, generate: Generate, prompts: Prompts, output_len: int) -> tuple[dict, Prompts]:
    """Throughput over the wall-clock span of one call for all prompts, after a short warm-up call.
    setup_s is the part of the span before the requests were queued (generate_batch's manager and cache)."""
    generate(prompts[:WARMUP_REQUESTS], WARMUP_OUTPUT_LEN)
    start = time.perf_counter()
    outputs, queued_at = generate(prompts, output_len)
    seconds = time.perf_counter() - start
    num_output = sum(len(o) for o in outputs)
    num_total = num_output + sum(len(p) for p in prompts)
    row = dict(system=name, seconds=seconds, output_tokens=num_output, total_tokens=num_total,
               output_tok_s=num_output / seconds, total_tok_s=num_total / seconds,
               setup_s=0.0 if queued_at is None else queued_at - start)
    print(f"{name}: {seconds:.1f} s, {row['output_tok_s']:.1f} output tok/s", flush=True)
    return row, outputs


def speedups(rows: list[dict]) -> dict[str, float]:
    ours = next(r for r in rows if r["system"] == ENGINE)
    return {r["system"]: ours["output_tok_s"] / r["output_tok_s"] for r in rows if r is not ours and "error" not in r}


def write_results(result: dict, out: Path, to_markdown: Callable[[dict], str] | None = None) -> None:
    """result as JSON at out, and as markdown beside it where to_markdown is given."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if to_markdown is None:
        print(f"wrote {out}")
        return
    out.with_suffix(".md").write_text(to_markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")
