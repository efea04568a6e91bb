"""The host's share of an engine step, on the CPU: what the step loop costs per sequence when the model costs
next to nothing.

The real engine (scheduler, executor, runner input building, sampling, stop checks, outputs, streams) drives a
one-layer Llama of hidden size 8 whose forward is, by default, a stand-in: the embedding of each new token, no
attention and no KV writes (--forward real runs the real tiny layer). The model's time is measured apart and left
out, so what is reported is host Python per step.

Two workloads, each with the overlapped loop on and off:
- steady: --num-requests (1024) decoding at once; after the ramp-up (no request waiting), --window steps are
  timed one by one; each with two kinds of reader (--readers): "step", a server's, which takes every step's new
  tokens off the streams, and "end", an offline caller's (LLM.generate), told once a request ends;
- whole: --whole-requests (2048) through LLM.generate, the whole run timed, prefill and tail included
  (bench.gpu_profile's and bench.offline_gpu's workload: prompts U(64, 512) random ids, 256 output tokens, greedy,
  EOS ignored). --temperature above 0 makes every row sample instead (top-k/top-p off).

Times are the engine thread's CPU time (time.thread_time), which other processes on a shared machine disturb far
less than wall time; wall time is reported beside it. Means count the garbage collector's pauses (a full collection
comes every few steps and can cost more than a step); medians mostly miss them.

    PYTHONPATH=. python3 -m bench.host_path [--num-requests 1024] [--whole-requests 2048] [--loops on,off]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

from bench.offline_common import check_positive, make_prompts, write_results
from scheduler import LLM, SamplingParams
from server.loadgen import machine

TINY = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, intermediate_size=16,
            vocab_size=256, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
MAX_NUM_SEQS, MAX_BATCHED_TOKENS = 1024, 16384  # what a big GPU's engine takes for the 1B shape
LOOPS = {"on": True, "off": False}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=1024, help="sequences decoding in the steady workload")
    p.add_argument("--whole-requests", type=int, default=2048, help="requests of the whole-run workload (0: none)")
    p.add_argument("--min-prompt", type=int, default=64, help="shortest prompt, in tokens")
    p.add_argument("--max-prompt", type=int, default=512, help="longest prompt, in tokens")
    p.add_argument("--output-len", type=int, default=256, help="tokens generated per request (EOS ignored)")
    p.add_argument("--window", type=int, default=100, help="steady steps timed after the ramp-up")
    p.add_argument("--loops", default="on,off", help="overlapped loop: on, off or both (comma-separated)")
    p.add_argument("--readers", default="step,end", help="steady workload's readers: step, end or both")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (argmax only); else sampled rows")
    p.add_argument("--forward", default="stand-in", choices=["stand-in", "real"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/host_path_cpu_latest.json"),
                   help="JSON results; the markdown goes next to it with a .md suffix")
    args = p.parse_args(argv)
    check_positive(p, args, ("window",))
    if args.whole_requests < 0:
        p.error(f"--whole-requests must be >= 0, got {args.whole_requests}")
    args.loops = args.loops.split(",")
    if not args.loops or any(loop not in LOOPS for loop in args.loops):
        p.error(f"--loops takes on, off or on,off; got {','.join(args.loops)}")
    args.readers = args.readers.split(",")
    if not args.readers or any(reader not in ("step", "end") for reader in args.readers):
        p.error(f"--readers takes step, end or step,end; got {','.join(args.readers)}")
    return args


class ModelClock:
    """Wraps the model's forward (replaced by the stand-in unless real) and its logits, adding up their CPU time."""

    def __init__(self, model: torch.nn.Module, real: bool):
        self.seconds = 0.0
        forward = model.forward if real else (lambda input_ids, positions, kv_caches, meta:
                                              model.model.embed_tokens(input_ids))
        model.forward = self._timed(forward)
        model.compute_logits = self._timed(model.compute_logits)

    def _timed(self, fn):
        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - start
        return timed


def build(args: argparse.Namespace, overlap: bool, num_running: int) -> tuple[LLM, ModelClock]:
    """An engine as a big GPU's for the 1B shape, taking at least num_running sequences at once."""
    max_model_len = args.max_prompt + args.output_len
    kv_bytes_per_token = 2 * TINY["hidden_size"] * 4  # K and V, one layer, one KV head of width 8, float32
    llm = LLM(model=LlamaConfig(**TINY, max_position_embeddings=max_model_len), load_format="dummy", device="cpu",
              dtype="float32", max_num_seqs=max(MAX_NUM_SEQS, num_running), max_num_batched_tokens=MAX_BATCHED_TOKENS,
              max_model_len=max_model_len, overlap_scheduling=overlap,
              kv_cache_bytes=(num_running + 1) * (max_model_len + 16) * kv_bytes_per_token)
    return llm, ModelClock(llm.engine.model, args.forward == "real")


def params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, max_tokens=args.output_len, ignore_eos=True)


def prompts(args: argparse.Namespace, num_requests: int) -> list[list[int]]:
    return make_prompts(TINY["vocab_size"], num_requests, args.min_prompt, args.max_prompt, args.seed)


def steady(args: argparse.Namespace, overlap: bool, reader: str) -> dict:
    """Host time of each of --window decoding steps at --num-requests running."""
    llm, clock = build(args, overlap, args.num_requests)
    engine = llm.engine
    streams = {}
    for ids in prompts(args, args.num_requests):
        stream = engine.add_request(None, params(args), prompt_token_ids=ids,
                                    **({} if reader == "step" else dict(deltas=False)))
        streams[stream.request_id] = stream

    def read(outputs: list) -> int:
        """Take a step's outputs off their streams, as a server does (left there, they would pile up)."""
        for output in outputs:
            streams[output.request_id].get_nowait()
        return len(outputs)

    ramp = 0
    while engine.num_waiting or ramp < 3:  # the step after the last admission still carries prompt tokens
        read(engine.step())
        ramp += 1
    host_ms, per_seq_us, wall_ms, running = [], [], [], []
    for _ in range(args.window):
        if not engine.has_unfinished():
            break
        model_before, cpu, wall = clock.seconds, time.thread_time(), time.perf_counter()
        outputs = engine.step()  # a sequence's new tokens, or its end
        host = time.thread_time() - cpu - (clock.seconds - model_before)
        wall_ms.append(1e3 * (time.perf_counter() - wall))
        read(outputs)
        num_sequences = engine.last_step_stats.num_generation_tokens  # each decoding sequence's new token
        host_ms.append(1e3 * host)
        running.append(num_sequences)
        per_seq_us.append(1e6 * host / max(num_sequences, 1))
    return dict(loop="on" if overlap else "off", reader=reader, ramp_steps=ramp, steps=len(host_ms),
                sequences=statistics.median(running), host_ms_per_step=summary(host_ms),
                host_us_per_seq=summary(per_seq_us), wall_ms_per_step=summary(wall_ms),
                model_ms_per_step=1e3 * clock.seconds / max(ramp + len(host_ms), 1))


def whole(args: argparse.Namespace, overlap: bool) -> dict:
    """The whole run of --whole-requests through LLM.generate: host time in all, a step, and a sequence a step."""
    llm, clock = build(args, overlap, MAX_NUM_SEQS)
    step, counts = llm.engine.step, dict(steps=0, seq_steps=0)

    def counted():
        outputs = step()
        counts["steps"] += 1
        counts["seq_steps"] += llm.engine.last_step_stats.num_generation_tokens  # sequences given a token
        return outputs

    llm.engine.step = counted
    cpu, wall = time.thread_time(), time.perf_counter()
    outputs = llm.generate(prompts(args, args.whole_requests), params(args))
    host = time.thread_time() - cpu - clock.seconds
    steps = counts["steps"]
    return dict(loop="on" if overlap else "off", steps=steps, output_tokens=sum(len(o.token_ids) for o in outputs),
                host_s=host, wall_s=time.perf_counter() - wall, model_s=clock.seconds,
                host_ms_per_step=1e3 * host / steps, host_us_per_seq=1e6 * host / max(counts["seq_steps"], 1))


def summary(values: list[float]) -> dict:
    return dict(mean=statistics.mean(values), median=statistics.median(values), min=min(values))


def to_markdown(result: dict) -> str:
    m, w = result["machine"], result["workload"]
    lines = ["# Host time of an engine step (CPU)", "",
             f"{m['date']} · {m['cpu']} ({m['logical_cores']} cores, load {m['load_average_at_start']}) · torch "
             f"{m['torch']} · forward: {w['forward']}", "",
             f"Steady: {w['num_requests']} requests decoding, {w['window']} steps timed after the ramp-up, "
             f"temperature {w['temperature']:g}.", "",
             "| loop | reader | steps | sequences a step | host ms/step (mean, median) | host µs/seq/step (mean) "
             "| wall ms/step (mean) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["steady"]:
        lines.append(f"| overlap {r['loop']} | {r['reader']} | {r['steps']} | {r['sequences']:.0f} | "
                     f"{r['host_ms_per_step']['mean']:.2f}, {r['host_ms_per_step']['median']:.2f} | "
                     f"{r['host_us_per_seq']['mean']:.2f} | {r['wall_ms_per_step']['mean']:.2f} |")
    if result["whole"]:
        lines += ["", f"Whole run: {w['whole_requests']} requests, prompts {w['min_prompt']}–{w['max_prompt']}, "
                      f"{w['output_len']} output tokens, greedy, EOS ignored.", "",
                  "| loop | steps | output tokens | host s | host ms/step | host µs/seq/step | wall s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| overlap {r['loop']} | {r['steps']} | {r['output_tokens']} | {r['host_s']:.2f} | "
                  f"{r['host_ms_per_step']:.2f} | {r['host_us_per_seq']:.2f} | {r['wall_s']:.2f} |"
                  for r in result["whole"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the host path is one thread; the stand-in's torch ops gain nothing from more
    workload = {k: getattr(args, k) for k in ("num_requests", "whole_requests", "min_prompt", "max_prompt",
                                              "output_len", "window", "forward", "seed", "temperature")}
    facts = machine.machine_facts(python=platform.python_version(), torch=torch.__version__)
    result = dict(machine=facts, workload=workload, steady=[], whole=[])
    for loop in args.loops:
        for reader in args.readers:
            r = steady(args, LOOPS[loop], reader)
            result["steady"].append(r)
            print(f"steady, overlap {loop}, reader {reader}: {r['host_ms_per_step']['mean']:.2f} host ms/step, "
                  f"{r['host_us_per_seq']['mean']:.2f} µs/seq/step", flush=True)
    for loop in args.loops if args.whole_requests else []:
        result["whole"].append(whole(args, LOOPS[loop]))
        print(f"whole, overlap {loop}: {result['whole'][-1]['host_us_per_seq']:.2f} host µs/seq/step", flush=True)
    write_results(result, args.out, to_markdown)
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
