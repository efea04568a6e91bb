"""Where a step's time goes under a full load on a GPU, and how long the GPU waits for the host.

Random weights of a real shape (bench.offline_gpu's shapes), all requests queued at once, greedy, EOS ignored.
Once the engine has ramped up (no request waiting, or --ramp-steps), it profiles --window steps twice:
- the device alone (CUDA activity only, so the profiler adds next to nothing to the host's work): the GPU's busy
  time is the union of its kernel and copy intervals, and idle is the rest of the span from the first to the
  last of them, with the overlapped loop on and, with --compare-overlap, off;
- host and device (CPU and CUDA activity): the top operators by device time and by host time.

    PYTHONPATH=. python3 -m bench.gpu_profile --shape llama-1b --num-requests 1024 [--compare-overlap]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

from bench.offline_common import make_prompts, write_results
from bench.offline_gpu import SHAPES, model_config
from scheduler import LLM, SamplingParams
from server.loadgen import machine

TOP_OPS = 15


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-1b", choices=list(SHAPES))
    p.add_argument("--num-requests", type=int, default=1024)
    p.add_argument("--min-prompt", type=int, default=64, help="shortest prompt, in tokens")
    p.add_argument("--max-prompt", type=int, default=512, help="longest prompt, in tokens")
    p.add_argument("--output-len", type=int, default=256, help="tokens generated per request (EOS ignored)")
    p.add_argument("--ramp-steps", type=int, default=400, help="most steps run before profiling, waiting for the "
                   "queue to empty into the running batch")
    p.add_argument("--window", type=int, default=200, help="steps profiled in each window")
    p.add_argument("--compare-overlap", action="store_true", help="also run with the overlapped loop off")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--engine-kwargs", type=json.loads, default={}, help="JSON of extra EngineConfig options")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/gpu_profile.json"),
                   help="JSON results; the markdown goes next to it with a .md suffix")
    args = p.parse_args(argv)
    for name in ("num_requests", "min_prompt", "output_len", "window"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_prompt < args.min_prompt:
        p.error(f"--max-prompt must be >= --min-prompt ({args.min_prompt}), got {args.max_prompt}")
    if args.ramp_steps < 0:
        p.error(f"--ramp-steps must be >= 0, got {args.ramp_steps}")
    return args


def device_busy(prof) -> dict:
    """The device's activity (kernels, copies) in a profile, against the span it covers."""
    return busy_time([(e.start_ns(), e.start_ns() + e.duration_ns()) for e in prof.profiler.kineto_results.events()
                      if e.device_type() == torch.autograd.DeviceType.CUDA and e.duration_ns() > 0])


def busy_time(intervals: list[tuple[int, int]]) -> dict:
    """The union of [start, end) intervals in ns against the span from the first start to the last end."""
    if not intervals:
        return dict(kernels=0, span_ms=0.0, busy_ms=0.0, idle_fraction=None)
    intervals = sorted(intervals)
    busy, (start, end) = 0, intervals[0]
    for lo, hi in intervals[1:]:
        if lo > end:
            busy, start = busy + end - start, lo
        end = max(end, hi)
    busy += end - start
    span = max(hi for _, hi in intervals) - intervals[0][0]
    return dict(kernels=len(intervals), span_ms=span / 1e6, busy_ms=busy / 1e6, idle_fraction=1 - busy / span)


def top_ops(prof, key: str) -> list[dict]:
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:TOP_OPS]
    return [dict(name=e.key, calls=e.count, self_device_ms=e.self_device_time_total / 1e3,
                 self_cpu_ms=e.self_cpu_time_total / 1e3) for e in rows]


def run(args: argparse.Namespace, overlap: bool, with_table: bool) -> dict:
    config = model_config(args.shape)
    llm = LLM(model=config, load_format="dummy", dtype=args.dtype, overlap_scheduling=overlap,
              max_model_len=args.max_prompt + args.output_len, **args.engine_kwargs)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(make_prompts(config.vocab_size, 2, 16, 16, args.seed + 1), SamplingParams(max_tokens=4))
    for ids in make_prompts(config.vocab_size, args.num_requests, args.min_prompt, args.max_prompt, args.seed):
        engine.add_request(None, params, prompt_token_ids=ids, deltas=False)  # read at the end, as LLM.generate does
    ramp = 0
    while ramp < args.ramp_steps and (engine.num_waiting or ramp < 10) and engine.has_unfinished:
        engine.step()
        ramp += 1

    def window(activities) -> tuple[object, list[float], float]:
        step_ms, batched = [], []
        torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(args.window):
                if not engine.has_unfinished:
                    break
                start = time.perf_counter()
                engine.step()
                step_ms.append(1e3 * (time.perf_counter() - start))
                batched.append(engine.last_step_stats.num_batched_tokens)
            torch.cuda.synchronize()
        return prof, step_ms, statistics.mean(batched) if batched else 0.0

    prof, step_ms, batched = window([ProfilerActivity.CUDA])
    result = dict(overlap=overlap, ramp_steps=ramp, running=engine.num_running, waiting=engine.num_waiting,
                  steps=len(step_ms), mean_batched_tokens=batched, host_step_ms=dict(
                      mean=statistics.mean(step_ms), median=statistics.median(step_ms)),
                  device=device_busy(prof), max_num_seqs=engine.config.max_num_seqs,
                  max_num_batched_tokens=engine.config.max_num_batched_tokens)
    print(f"overlap {'on' if overlap else 'off'}: {result['steps']} steps at {engine.num_running} running, "
          f"{result['host_step_ms']['mean']:.2f} ms/step, GPU idle {percent(result['device']['idle_fraction'])}",
          flush=True)
    if with_table:
        prof, _, _ = window([ProfilerActivity.CPU, ProfilerActivity.CUDA])
        result["by_device_time"] = top_ops(prof, "self_device_time_total")
        result["by_host_time"] = top_ops(prof, "self_cpu_time_total")
    engine.shutdown()
    return result


def percent(fraction: float | None) -> str:
    return "—" if fraction is None else f"{fraction:.1%}"


def ops_table(rows: list[dict]) -> list[str]:
    lines = ["| operator | calls | self device ms | self host ms |", "|---|---:|---:|---:|"]
    return lines + [f"| `{r['name'][:70]}` | {r['calls']} | {r['self_device_ms']:.1f} | {r['self_cpu_ms']:.1f} |"
                    for r in rows]


def to_markdown(result: dict) -> str:
    m, w = result["machine"], result["workload"]
    lines = ["# Where the step time goes under a full load", "",
             f"{m['date']} · **{m['gpu']}** · torch {m['torch']} · {w['dtype']} · shape {w['shape']}", "",
             f"{w['num_requests']} requests queued at once, prompts {w['min_prompt']}–{w['max_prompt']} random "
             f"tokens, {w['output_len']} output tokens, greedy, EOS ignored; engine options "
             f"{json.dumps(w['engine_kwargs'])}. Profiled after the ramp-up, {w['window']} steps a window.", "",
             "| loop | steps | running | mean tokens/step | host ms/step | GPU busy ms | span ms | GPU idle |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        d = r["device"]
        lines.append(f"| overlap {'on' if r['overlap'] else 'off'} | {r['steps']} | {r['running']} | "
                     f"{r['mean_batched_tokens']:.0f} | {r['host_step_ms']['mean']:.2f} | {d['busy_ms']:.0f} | "
                     f"{d['span_ms']:.0f} | {percent(d['idle_fraction'])} |")
    first = result["runs"][0]
    if "by_device_time" in first:
        lines += ["", "Top operators by device time (overlap on; a CUDA graph's kernels are listed by kernel):", ""]
        lines += ops_table(first["by_device_time"])
        lines += ["", "Top operators by host time:", ""] + ops_table(first["by_host_time"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu_profile needs a CUDA device")
    workload = {k: getattr(args, k) for k in ("shape", "num_requests", "min_prompt", "max_prompt", "output_len",
                                              "window", "dtype", "engine_kwargs", "seed")}
    facts = machine.machine_facts(gpu=torch.cuda.get_device_name(), python=platform.python_version(),
                                  torch=torch.__version__, transformers=transformers.__version__)
    result = dict(machine=facts, workload=workload, runs=[run(args, overlap=True, with_table=True)])
    if args.compare_overlap:
        gc.collect()
        torch.cuda.empty_cache()
        result["runs"].append(run(args, overlap=False, with_table=False))
    write_results(result, args.out, to_markdown)
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
