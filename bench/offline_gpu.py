"""Offline throughput and latency on a GPU, random weights of real model shapes: HF generate() in static batches,
HF generate_batch() (continuous batching) and our engine in one process, vLLM (when it imports) in a process of
its own on the same prompts, plus batch-1 time per output token, the time to first token of a 512-token prompt
on an idle engine, and how far each is from the card's limits (weight bytes over memory bandwidth for batch-1
decode; matmul FLOPs over peak for the throughput workload), computed from the shape.

    PYTHONPATH=. python3 -m bench.offline_gpu [--shapes smollm2-135m,llama-1b] [--engine-kwargs '{...}']
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
import traceback

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig

from bench import vllm_peer
from bench.offline_common import (
    ENGINE,
    HF_CONTINUOUS,
    HF_STATIC,
    WARMUP_OUTPUT_LEN,
    Generate,
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
from bench.run_breakdown import StepRecorder, breakdown
from bench.run_breakdown import to_markdown as breakdown_markdown
from scheduler import LLM
from server.loadgen import machine

SHAPES = {  # LlamaConfig fields; no weights are read, both sides initialise the shape randomly
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True,
                         max_position_embeddings=8192, rms_norm_eps=1e-5),
    # Llama-3.2-1B without its llama3 rope scaling, which changes the rotary tables, not the work per token.
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True,
                     head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5),
    "llama-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False,
                     head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=2048),
}
# Issue #5: throughput >= 10x HF generate_batch(), batch-1 decode and idle-engine TTFT of a 512-token prompt.
TARGETS = {"smollm2-135m": dict(speedup=10.0, decode_ms=1.5, ttft_ms=15.0),
           "llama-1b": dict(speedup=10.0, decode_ms=2.0, ttft_ms=15.0)}
# Memory bandwidth (bytes/s) and dense bf16 peak (FLOP/s) of the cards these runs meet, from their data sheets.
CARDS = {"H200": (4.8e12, 989e12), "H100": (3.35e12, 989e12), "A100": (2.0e12, 312e12)}
BATCH1_PROMPT, TTFT_PROMPT = 128, 512
ENGINE_RUNS, HF_BATCH1_RUNS, TTFT_RUNS = 3, 1, 5  # medians; an HF batch-1 run of 256 tokens takes ~10 s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p, num_requests=256, min_prompt=64, max_prompt=512, output_len=256,
                      out="bench/results/offline_gpu.json")
    p.add_argument("--shapes", type=lambda s: s.split(","), default=["smollm2-135m", "llama-1b"],
                   help=f"comma-separated, from: {', '.join(SHAPES)}")
    p.add_argument("--hf-num-requests", type=int, default=None,
                   help="run the HF systems on the first N requests only (default: all). Throughput is a rate, but "
                        "fewer requests also means fewer in flight at once, which lowers HF's tok/s")
    p.add_argument("--hf-batch-size", type=int, default=64, help="static batch size of HF generate()")
    p.add_argument("--hf-max-batch-tokens", type=int, default=None,
                   help="generate_batch()'s token budget per step (default: its own choice from GPU memory)")
    p.add_argument("--skip-vllm", action="store_true", help="leave vLLM out even when it imports")
    p.add_argument("--vllm-kwargs", type=json.loads, default={}, help="JSON of extra vllm.LLM options")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--engine-kwargs", type=json.loads, default={},
                   help='JSON of extra EngineConfig options, e.g. \'{"max_num_batched_tokens": 4096}\'')
    args = p.parse_args(argv)
    check_positive(p, args, ("hf_batch_size",))
    if args.output_len < 2:
        p.error(f"--output-len must be >= 2 (decode time is measured past the first token), got {args.output_len}")
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        p.error(f"--shapes: unknown {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    if not isinstance(args.engine_kwargs, dict):
        p.error(f"--engine-kwargs must be a JSON object, got {args.engine_kwargs!r}")
    if args.hf_num_requests is not None and not 1 <= args.hf_num_requests <= args.num_requests:
        p.error(f"--hf-num-requests must be in [1, --num-requests], got {args.hf_num_requests}")
    return args


def model_config(shape: str) -> LlamaConfig:
    return LlamaConfig(**SHAPES[shape], bos_token_id=None, eos_token_id=None, pad_token_id=None)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(generate: Generate, prompt: list[int], output_len: int) -> float:
    start = time.perf_counter()
    (output,) = generate([prompt], output_len).outputs
    assert len(output) == output_len, f"asked for {output_len} tokens, got {len(output)}"
    return time.perf_counter() - start


def batch1(generate: Generate, vocab_size: int, output_len: int, runs: int, seed: int) -> dict:
    """One BATCH1_PROMPT-token prompt at a time: the median wall time of output_len tokens, and the decode time
    per token once the first is out, (t(output_len) - t(1)) / (output_len - 1). Fresh prompts each run, so the
    prefix cache never serves one."""
    prompts = make_prompts(vocab_size, 2 * runs + 1, BATCH1_PROMPT, BATCH1_PROMPT, seed)
    generate(prompts[-1:], WARMUP_OUTPUT_LEN)
    full = statistics.median(timed(generate, p, output_len) for p in prompts[:runs])
    first = statistics.median(timed(generate, p, 1) for p in prompts[runs:2 * runs])
    row = dict(runs=runs, prompt_len=BATCH1_PROMPT, output_len=output_len, ms_per_token=1e3 * full / output_len,
               decode_ms_per_token=1e3 * (full - first) / (output_len - 1), first_token_ms=1e3 * first)
    print(f"  batch 1: {row['ms_per_token']:.2f} ms/token, decode {row['decode_ms_per_token']:.2f} ms/token",
          flush=True)
    return row


def ttft(generate: Generate, vocab_size: int, seed: int) -> dict:
    """Wall time of max_tokens=1 for a TTFT_PROMPT-token prompt, the engine idle before each (fresh prompts)."""
    prompts = make_prompts(vocab_size, TTFT_RUNS + 1, TTFT_PROMPT, TTFT_PROMPT, seed)
    timed(generate, prompts[-1], 1)
    times_ms = [1e3 * timed(generate, p, 1) for p in prompts[:TTFT_RUNS]]
    print(f"  TTFT of a {TTFT_PROMPT}-token prompt: {statistics.median(times_ms):.2f} ms", flush=True)
    return dict(runs=TTFT_RUNS, prompt_len=TTFT_PROMPT, median_ms=statistics.median(times_ms), min_ms=min(times_ms),
                max_ms=max(times_ms))


# --- one shape -----------------------------------------------------------------------------------------------------

def run_hf(args: argparse.Namespace, shape: str, prompts: list[list[int]], device: torch.device) -> tuple[list, dict]:
    dtype = getattr(torch, args.dtype)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(shape), dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    static = measure_peer(HF_STATIC, hf_static(model, args.hf_batch_size), prompts, args.output_len)
    b1 = batch1(hf_static(model, 1), model.config.vocab_size, args.output_len, HF_BATCH1_RUNS, args.seed + 1)
    # Last: generate_batch() switches the model to paged attention while it runs.
    continuous = measure_peer(HF_CONTINUOUS, hf_continuous(model, args.hf_max_batch_tokens), prompts, args.output_len)
    return [static, continuous], b1


def measure_peer(name: str, generate: Generate, prompts: list[list[int]], output_len: int) -> dict:
    """A peer that fails (out of memory, an API change) is reported as failed; the run goes on."""
    try:
        row, _ = measure(name, generate, prompts, output_len)
    except Exception as exc:  # whatever it was goes into the results
        traceback.print_exc()
        free_memory()
        return dict(system=name, requests=len(prompts), error=f"{type(exc).__name__}: {exc}")
    return dict(row, requests=len(prompts))


def row_len(args: argparse.Namespace) -> int:
    """max_model_len of every engine: the longest prompt of any measurement plus its output."""
    return max(args.max_prompt, BATCH1_PROMPT, TTFT_PROMPT) + args.output_len


def limits(shape: str, prompts: list[list[int]], args: argparse.Namespace, device: torch.device) -> dict | None:
    """The card's floor for this shape: batch-1 decode reads every weight once per token; the throughput
    workload does 2 FLOPs per layer weight per token, prompt and output, and the LM head's for each output token
    (attention's own FLOPs left out, so a floor)."""
    card = next((CARDS[k] for k in CARDS if device.type == "cuda" and k in torch.cuda.get_device_name(device)), None)
    if card is None:
        return None
    bandwidth, peak = card
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(model_config(shape)).parameters())
    weight_bytes = params * torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
    config = SHAPES[shape]
    embedding = config["vocab_size"] * config["hidden_size"]
    layer_params = params - embedding * (1 if config.get("tie_word_embeddings") else 2)
    output_tokens = len(prompts) * args.output_len
    flops = 2 * layer_params * (sum(len(p) for p in prompts) + output_tokens) + 2 * embedding * output_tokens
    return dict(bandwidth_bytes_s=bandwidth, peak_flops=peak, params=params, weight_bytes=weight_bytes,
                decode_ms=1e3 * weight_bytes / bandwidth, throughput_s=flops / peak)


def run_engine(args: argparse.Namespace, shape: str, prompts: list[list[int]]) -> tuple[dict, dict, dict]:
    options = dict(load_format="dummy", dtype=args.dtype, max_model_len=row_len(args), **args.engine_kwargs)
    llm = LLM(model=model_config(shape), **options)
    generate, recorder = engine(llm), StepRecorder(llm.engine)

    def recorded(batch: list[list[int]], output_len: int):  # the steps of the last call (the timed one) are kept
        recorder.stats.clear()
        with recorder:
            return generate(batch, output_len)

    row, _ = measure(ENGINE, recorded, prompts, args.output_len)
    row["breakdown"] = breakdown(recorder.stats, sum(map(len, prompts)))
    b1 = batch1(generate, llm.engine.vocab_size, args.output_len, ENGINE_RUNS, args.seed + 1)
    return dict(row, requests=len(prompts)), b1, ttft(generate, llm.engine.vocab_size, args.seed + 2)


def run_shape(args: argparse.Namespace, shape: str, device: torch.device) -> dict:
    print(f"== {shape}", flush=True)
    started = time.perf_counter()
    prompts = make_prompts(SHAPES[shape]["vocab_size"], args.num_requests, args.min_prompt, args.max_prompt, args.seed)
    rows, batch1_rows = [], {}
    if not args.skip_hf:
        rows, batch1_rows["HF generate()"] = run_hf(args, shape, prompts[:args.hf_num_requests], device)
        free_memory()
    if vllm_peer.available() and not args.skip_vllm:  # first: its process ends, freeing all it took, before ours
        peer = vllm_peer.run(dict(config=SHAPES[shape], dtype=args.dtype, max_model_len=row_len(args), seed=args.seed,
                                  num_requests=args.num_requests, min_prompt=args.min_prompt,
                                  max_prompt=args.max_prompt, output_len=args.output_len, batch1_runs=ENGINE_RUNS,
                                  vllm_kwargs=args.vllm_kwargs))
        rows.append(peer.get("row") or dict(system=vllm_peer.VLLM, requests=args.num_requests, error=peer["error"]))
        if "batch1" in peer:
            batch1_rows[vllm_peer.VLLM] = peer["batch1"]
    row, batch1_rows[ENGINE], ttft_row = run_engine(args, shape, prompts)
    free_memory()
    rows.append(row)
    result = dict(config=SHAPES[shape], systems=rows, speedup=speedups(rows), batch1=batch1_rows, ttft=ttft_row,
                  seconds=time.perf_counter() - started, limits=limits(shape, prompts, args, device))
    continuous = next((r for r in rows if r["system"] == HF_CONTINUOUS and "error" not in r), None)
    if continuous is not None:
        serving_tok_s = continuous["output_tokens"] / (continuous["seconds"] - continuous["setup_s"])
        result["speedup_vs_generate_batch_without_setup"] = row["output_tok_s"] / serving_tok_s
    result["targets"] = check_targets(result, TARGETS.get(shape))
    return result


def check_targets(result: dict, targets: dict | None) -> dict | None:
    """Each target's value and whether it is met; the throughput ratio is the stricter one, against
    generate_batch() with its setup left out of its time."""
    if targets is None:
        return None
    values = dict(speedup=result.get("speedup_vs_generate_batch_without_setup"),
                  decode_ms=result["batch1"][ENGINE]["decode_ms_per_token"], ttft_ms=result["ttft"]["median_ms"])
    checks = {}
    for name, target in targets.items():
        value = values[name]
        met = None if value is None else (value >= target if name == "speedup" else value <= target)
        checks[name] = dict(target=target, value=value, met=met)
    return checks


# --- report --------------------------------------------------------------------------------------------------------

TARGET_TEXT = {"speedup": ("throughput vs HF generate_batch()", "≥", "x"), "decode_ms": ("batch-1 decode", "≤", " ms"),
               "ttft_ms": (f"TTFT of a {TTFT_PROMPT}-token prompt", "≤", " ms")}


def shape_markdown(name: str, r: dict) -> list[str]:
    c = r["config"]
    lines = [f"## {name}", "",
             f"hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} heads, "
             f"{c['num_key_value_heads']} KV heads, intermediate {c['intermediate_size']}, vocab {c['vocab_size']}; "
             f"random weights · {r['seconds']:.0f} s for this shape", "",
             "| system | requests | wall s | output tok/s | beastserve speed-up |", "|---|---:|---:|---:|---:|"]
    for row in r["systems"]:
        if "error" in row:
            lines.append(f"| {row['system']} | {row['requests']} | failed: {row['error'][:200]} | — | — |")
            continue
        speedup = r["speedup"].get(row["system"])
        setup = f" (of which setup {row['setup_s']:.1f})" if row["setup_s"] else ""
        lines.append(f"| {row['system']} | {row['requests']} | {row['seconds']:.1f}{setup} | "
                     f"{row['output_tok_s']:,.0f} | {'—' if speedup is None else f'{speedup:.1f}x'} |")
    ours = next((s for s in r["systems"] if s["system"] == ENGINE and "breakdown" in s), None)
    if ours is not None:
        lines += [""] + breakdown_markdown(ours["breakdown"])
    if "speedup_vs_generate_batch_without_setup" in r:
        lines += ["", "Against generate_batch() with its setup (manager, cache, CUDA graphs) left out of its time: "
                      f"{r['speedup_vs_generate_batch_without_setup']:.1f}x."]
    lines += ["", f"| batch 1, {BATCH1_PROMPT}-token prompt | runs | ms/token (wall / tokens) | decode ms/token | "
                  "first token ms |", "|---|---:|---:|---:|---:|"]
    for system, b in r["batch1"].items():
        lines.append(f"| {system} | {b['runs']} | {b['ms_per_token']:.2f} | {b['decode_ms_per_token']:.2f} | "
                     f"{b['first_token_ms']:.1f} |")
    if r.get("limits"):
        lim, ours = r["limits"], next(s for s in r["systems"] if s["system"] == ENGINE)
        lines += ["", f"Limits of the card for this shape ({lim['params'] / 1e9:.2f} B parameters, "
                      f"{lim['weight_bytes'] / 1e9:.2f} GB of weights): batch-1 decode "
                      f"{lim['decode_ms']:.2f} ms/token at {lim['bandwidth_bytes_s'] / 1e12:.2f} TB/s, ours at "
                      f"{lim['decode_ms'] / r['batch1'][ENGINE]['decode_ms_per_token']:.0%} of it; the throughput "
                      f"workload's matmuls {lim['throughput_s']:.2f} s at {lim['peak_flops'] / 1e12:.0f} TFLOP/s, "
                      f"ours at {lim['throughput_s'] / ours['seconds']:.0%} of it."]
    t = r["ttft"]
    lines += ["", f"TTFT of a {t['prompt_len']}-token prompt on an idle engine (beastserve, max_tokens=1, median of "
                  f"{t['runs']}): {t['median_ms']:.2f} ms (min {t['min_ms']:.2f}, max {t['max_ms']:.2f})."]
    if r["targets"]:
        parts = []
        for key, check in r["targets"].items():
            label, op, unit = TARGET_TEXT[key]
            value = "—" if check["value"] is None else f"{check['value']:.2f}{unit}"
            verdict = {True: "met", False: "missed", None: "not measured"}[check["met"]]
            parts.append(f"{label} {op} {check['target']:g}{unit}: {value}, **{verdict}**")
        lines += ["", "Targets (issue #5): " + "; ".join(parts) + "."]
    return lines + [""]


def to_markdown(result: dict) -> str:
    m, w = result["machine"], result["workload"]
    hf = "HF systems skipped" if w["skip_hf"] else f"HF systems: the first {w['hf_num_requests'] or w['num_requests']}"
    lines = ["# Offline throughput and latency on a GPU", "",
             f"{m['date']} · **{m['gpu']}** · {m['cpu']} ({m['logical_cores']} cores) · torch {m['torch']} · "
             f"transformers {m['transformers']} · {w['dtype']}", "",
             f"{w['num_requests']} requests ({hf}), prompts {w['min_prompt']}–"
             f"{w['max_prompt']} random token ids (seed {w['seed']}), {w['output_len']} output tokens each, greedy, "
             f"EOS ignored; HF static batch size {w['hf_batch_size']}, HF sdpa attention; generate_batch() step "
             f"budget {w['hf_max_batch_tokens'] or 'its own'}; engine options {json.dumps(w['engine_kwargs'])}. "
             "Throughput is output tokens over the wall time of one call for all requests, after a warm-up.", ""]
    for name, r in result["shapes"].items():
        lines += shape_markdown(name, r)
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------------------------

def machine_facts(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU (CPU run)"
    return machine.machine_facts(gpu=gpu, python=platform.python_version(), torch=torch.__version__,
                                 transformers=transformers.__version__)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()  # NO_EOS draws a warning per generate() call
    transformers.logging.disable_progress_bar()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    facts = machine_facts(device)
    workload = {name: getattr(args, name) for name in ("num_requests", "hf_num_requests", "min_prompt", "max_prompt",
                                                       "output_len", "hf_batch_size", "hf_max_batch_tokens", "dtype",
                                                       "engine_kwargs", "seed", "skip_hf")}
    result = dict(machine=facts, workload=workload, shapes={})
    for shape in args.shapes:
        result["shapes"][shape] = run_shape(args, shape, device)
        write_results(result, args.out, to_markdown)  # after each shape, so a later failure keeps the earlier ones
    print("\n" + to_markdown(result))
    return result


if __name__ == "__main__":
    main()
