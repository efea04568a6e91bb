"""What the daemon costs against the offline engine at unbounded load, on the CPU.

One workload (--num-requests, default 1024, prompts U(64, 512) random ids, 256 output tokens, greedy, EOS ignored)
runs (a) through the offline engine (LLM.generate, one process) and (b) through the real daemon (`beastserve
serve` in a process of its own) with --clients client processes streaming over real gRPC, every request sent at
once, once per service: beastserve.v1's GenerateStream (token ids and text) and the gateways' VllmEngine Generate
(token ids only). The model is bench.host_path's: a one-layer Llama of hidden size 8 whose forward is a stand-in
costing next to nothing, so what is measured is host work; it has a byte-level tokenizer (256 tokens), so text is
made where a real model's would be.

The machine may be shared and have few cores: client processes, the daemon and other work compete for them, so
wall time says little. CPU time is reported beside it, per thread of the daemon (read from /proc): the engine
thread, the event loop's (main) thread and the rest (gRPC's own threads and the edge's pool). The engine thread and
the event loop take turns holding one GIL, so on a machine with cores to spare the daemon's throughput is bounded
by their CPU time per token together; against the offline engine's CPU time per token this gives the "CPU ratio".

    PYTHONPATH=. python3 -m bench.daemon_vs_offline [--num-requests 1024] [--clients 4] [--services beastserve.v1,vllm]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pickle
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.daemon_clients import SERVICES, client, text_digest, token_digest
from bench.daemon_report import to_markdown
from bench.daemon_stand_in import ENGINE_TID_FILE, PROFILE_DIR, serve_stand_in
from bench.host_path import MAX_BATCHED_TOKENS, MAX_NUM_SEQS, TINY, ModelClock
from bench.offline_common import check_positive, make_prompts, write_results
from bench.startup import free_port, ready
from server.loadgen import machine

ROOT = Path(__file__).resolve().parents[1]
CLIENT_START_S = 3.0  # after every client's channel is ready
TICKS = os.sysconf("SC_CLK_TCK")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=1024)
    p.add_argument("--min-prompt", type=int, default=64, help="shortest prompt, in tokens")
    p.add_argument("--max-prompt", type=int, default=512, help="longest prompt, in tokens")
    p.add_argument("--output-len", type=int, default=256, help="tokens generated per request (EOS ignored)")
    p.add_argument("--clients", type=int, default=4, help="client processes, the requests split between them")
    p.add_argument("--services", default=",".join(SERVICES), help="beastserve.v1, vllm or both (comma-separated)")
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument("--serve-args", action="append", help="more `beastserve serve` flags, e.g. '--stream-interval 8' "
                   "(repeatable: each set is a daemon run per service; default: none)")
    p.add_argument("--profile", type=Path, help="run the daemon's engine thread and event loop under cProfile, "
                   "writing their stats to this directory (figures then include the profiler's cost)")
    p.add_argument("--label", default="", help="a name for this run in the results (the change measured)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/daemon_vs_offline_cpu_latest.json"),
                   help="JSON results; the markdown goes next to it with a .md suffix")
    args = p.parse_args(argv)
    args.serve_args = args.serve_args or [""]
    check_positive(p, args, ("clients",))
    args.services = args.services.split(",")
    if any(s not in SERVICES for s in args.services):
        p.error(f"--services takes {' or '.join(SERVICES)} (comma-separated); got {','.join(args.services)}")
    return args


# --- the model -----------------------------------------------------------------------------------------------------

def write_model(path: Path, max_model_len: int) -> None:
    """bench.host_path's tiny Llama (config only: dummy weights) with a byte-level tokenizer of its 256 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    LlamaConfig(**TINY, max_position_embeddings=max_model_len).save_pretrained(path)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, clean_up_tokenization_spaces=False).save_pretrained(path)


def engine_options(args: argparse.Namespace) -> dict:
    """As a big GPU's engine for the 1B shape (bench.host_path.build), every request running at once."""
    max_model_len = args.max_prompt + args.output_len
    kv_bytes_per_token = 2 * TINY["hidden_size"] * 4
    return dict(load_format="dummy", device="cpu", dtype="float32", max_num_seqs=max(MAX_NUM_SEQS, args.num_requests),
                max_num_batched_tokens=MAX_BATCHED_TOKENS, max_model_len=max_model_len,
                kv_cache_bytes=(args.num_requests + 1) * (max_model_len + 16) * kv_bytes_per_token)


# --- (a) the offline engine ----------------------------------------------------------------------------------------

def offline(args: argparse.Namespace, model_dir: Path, prompts: list[list[int]]) -> tuple[dict, list[tuple[str, str]]]:
    from scheduler import LLM, SamplingParams

    llm = LLM(model=str(model_dir), **engine_options(args))
    clock = ModelClock(llm.engine.model, real=False)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=1))  # warm-up, as the daemon's
    clock.seconds = 0.0
    wall, cpu, thread = time.perf_counter(), time.process_time(), time.thread_time()
    outputs = llm.generate(prompts, params)
    wall, cpu, thread = time.perf_counter() - wall, time.process_time() - cpu, time.thread_time() - thread
    tokens = sum(len(o.token_ids) for o in outputs)
    llm.engine.shutdown()
    return (dict(tokens=tokens, wall_s=wall, cpu_s=cpu, engine_thread_cpu_s=thread, model_cpu_s=clock.seconds),
            [(token_digest(o.token_ids), text_digest(o.text)) for o in outputs])


def offline_engine_text(args: argparse.Namespace, model_dir: Path, prompts: list[list[int]]) -> dict:
    """The offline engine with its text made in the engine, token by token (detokenize=True), each stream told once
    at the end as LLM.generate reads it: what LLM.generate cost before text was made by the reader, at the end."""
    from scheduler import LLM, SamplingParams

    llm = LLM(model=str(model_dir), **engine_options(args))
    ModelClock(llm.engine.model, real=False)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    wall, cpu = time.perf_counter(), time.process_time()
    streams = [engine.add_request(None, params, prompt_token_ids=ids, deltas=False, detokenize=True) for ids in prompts]
    while engine.has_unfinished():
        engine.step()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = sum(len(o.token_ids) for s in streams for o in iter(s.get_nowait, None))
    engine.shutdown()
    return dict(tokens=tokens, wall_s=wall, cpu_s=cpu)


def engine_core(args: argparse.Namespace, model_dir: Path, prompts: list[list[int]], detokenize: bool) -> dict:
    """What an engine core in a process of its own would cost: the engine making every step's deltas (as the daemon
    asks, text or not) and packing them into one compact message a step, (request ids, token ids[, texts]) pickled,
    as it would send them to a front end. No front end: this is the engine process's share alone."""
    from scheduler import LLM, SamplingParams

    llm = LLM(model=str(model_dir), **engine_options(args))
    ModelClock(llm.engine.model, real=False)
    engine, step_outputs = llm.engine, []
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    wall, cpu = time.perf_counter(), time.process_time()
    for i, ids in enumerate(prompts):
        engine.add_request(None, params, request_id=f"r{i}", prompt_token_ids=ids, on_output=step_outputs.append,
                           detokenize=detokenize)
    tokens = message_bytes = 0
    while engine.has_unfinished():
        engine.step()
        ids, token_ids = [o.request_id for o in step_outputs], [o.token_ids for o in step_outputs]
        texts = [o.text for o in step_outputs] if detokenize else None
        message_bytes += len(pickle.dumps((ids, token_ids, texts), protocol=pickle.HIGHEST_PROTOCOL))
        tokens += sum(map(len, token_ids))
        step_outputs.clear()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    engine.shutdown()
    return dict(detokenize=detokenize, tokens=tokens, wall_s=wall, cpu_s=cpu, message_bytes=message_bytes)


def without_grpc(args: argparse.Namespace, model_dir: Path, prompts: list[list[int]], detokenize: bool) -> dict:
    """The daemon's engine side without gRPC: the engine in AsyncEngine's thread, its metrics on, one asyncio task a
    request on a uvloop taking the outputs (as a call does) and sending nothing. Parts the daemon's cost into what
    the engine thread and the hop to the loop take, and what gRPC adds."""
    import asyncio

    import uvloop

    from scheduler import LLM, SamplingParams
    from server.async_engine import AsyncEngine
    from server.metrics import ServerMetrics

    llm = LLM(model=str(model_dir), **engine_options(args))
    ModelClock(llm.engine.model, real=False)
    served = AsyncEngine(llm.engine, ServerMetrics("bench"), max_queue_size=2 * len(prompts))
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    counts = dict(tokens=0, takes=0)

    async def one(i: int, ids: list[int]) -> None:
        async for output in served.generate(ids, params, f"r{i}", detokenize=detokenize):
            counts["tokens"] += len(output.token_ids)
            counts["takes"] += 1

    async def run_all() -> None:
        await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))

    served.start()
    pid = os.getpid()
    before, wall = thread_cpu(pid), time.perf_counter()
    uvloop.run(run_all())
    after, wall = thread_cpu(pid), time.perf_counter() - wall
    engine_tid = served._thread.native_id
    served.stop()
    k = counts["tokens"] / 1000
    return dict(detokenize=detokenize, tokens=counts["tokens"], tokens_per_take=counts["tokens"] / counts["takes"],
                wall_s=wall, engine_thread_cpu_s=(after[engine_tid] - before.get(engine_tid, 0.0)),
                event_loop_cpu_s=after[pid] - before[pid],
                cpu_s_per_1k_tokens=dict(engine_thread=(after[engine_tid] - before.get(engine_tid, 0.0)) / k,
                                         event_loop=(after[pid] - before[pid]) / k))


# --- (b) the daemon ------------------------------------------------------------------------------------------------

def profile_dir(args: argparse.Namespace, service: str) -> Path:
    path = (args.profile / service).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of a process, by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / TICKS
    return out


def wait_ready(address: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready(address):
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the daemon at {address} was not ready within {timeout:.0f} s")
        time.sleep(0.2)


def daemon(args: argparse.Namespace, model_dir: Path, prompts: list[list[int]], service: str, serve_args: str,
           workdir: Path) -> tuple[dict, dict[str, tuple[str, str]]]:
    port, tid_file = free_port(), workdir / f"engine-tid-{service}"
    core_file = tid_file.with_suffix(".core")  # written by an engine core in a process of its own
    tid_file.unlink(missing_ok=True)
    core_file.unlink(missing_ok=True)
    flags = ["--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
             "--http-port", "0", "--max-queue-size", str(2 * args.num_requests)]
    for name, value in engine_options(args).items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    flags += shlex.split(serve_args)
    log_path = workdir / f"daemon-{service}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bench.daemon_vs_offline", "serve-stand-in", *flags],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT), ENGINE_TID_FILE: str(tid_file),
                                     **({PROFILE_DIR: str(profile_dir(args, service))} if args.profile else {})})
    try:
        address = f"127.0.0.1:{port}"
        wait_ready(address, proc)
        if core_file.exists():
            result, digests = drive(args, address, prompts, service, proc.pid, None, int(core_file.read_text()))
        else:
            result, digests = drive(args, address, prompts, service, proc.pid, int(tid_file.read_text()))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            result_code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    result["daemon_exit_code"], result["serve_args"] = result_code, serve_args
    gc_file = tid_file.with_suffix(".gc.json")
    if gc_file.exists():  # the passes while the clients ran
        passes = [(gen, s) for t, gen, s in json.loads(gc_file.read_text()) if result["start"] <= t <= result["end"]]
        result["gc"] = dict(passes=[sum(g == gen for g, _ in passes) for gen in range(3)],
                            seconds=[round(sum(s for g, s in passes if g == gen), 3) for gen in range(3)])
    if result_code != 0:
        print(log_path.read_text()[-3000:], file=sys.stderr)
    return result, digests


def drive(args: argparse.Namespace, address: str, prompts: list[list[int]], service: str, pid: int,
          engine_tid: int | None, core_pid: int | None = None) -> tuple[dict, dict[str, tuple[str, str]]]:
    """Every request at once from --clients processes; the daemon's CPU per thread over the whole pass. With an
    engine core in a process of its own (core_pid), "engine thread" is that process, all its threads."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    requests = [(f"r{i}", ids) for i, ids in enumerate(prompts)]
    start_at = time.time() + CLIENT_START_S
    clients = [context.Process(target=client, args=(address, service, requests[c::args.clients], args.output_len,
                                                   start_at, results)) for c in range(args.clients)]
    before, core_before = thread_cpu(pid), sum(thread_cpu(core_pid).values()) if core_pid else 0.0
    for c in clients:
        c.start()
    answers = [results.get(timeout=900) for _ in clients]
    for c in clients:
        c.join()
    after, core_after = thread_cpu(pid), sum(thread_cpu(core_pid).values()) if core_pid else 0.0
    spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    engine_cpu = core_after - core_before if core_pid else spent.get(engine_tid, 0.0)
    start, end = min(a["start"] for a in answers), max(a["end"] for a in answers)
    tokens = sum(a["tokens"] for a in answers)
    errors = [e for a in answers for e in a["errors"]]
    digests = {rid: (d, a["text_digests"][rid]) for a in answers for rid, d in a["digests"].items()}
    return dict(service=service, start=start, end=end, tokens=tokens, messages=sum(a["messages"] for a in answers),
                wall_s=end - start,
                engine_core="process" if core_pid else "thread",
                engine_thread_cpu_s=engine_cpu, event_loop_cpu_s=spent.get(pid, 0.0),
                other_threads_cpu_s=sum(v for tid, v in spent.items() if tid not in (pid, engine_tid)),
                clients_cpu_s=[round(a["cpu_s"], 2) for a in answers], errors=errors[:10],
                num_errors=len(errors)), digests


# --- the comparison ------------------------------------------------------------------------------------------------

def derive(offline_run: dict | None, run: dict, engine_text_run: dict | None = None) -> None:
    """Per-1k-token CPU figures and the ratios against the offline engine, added to a daemon run."""
    k = run["tokens"] / 1000
    run["tokens_per_message"] = run["tokens"] / max(run["messages"], 1)
    run["cpu_s_per_1k_tokens"] = {name: run[f"{name}_cpu_s"] / k for name in ("engine_thread", "event_loop",
                                                                               "other_threads")}
    run["output_tok_per_s"] = run["tokens"] / run["wall_s"]
    if offline_run is not None:
        offline_per_token = offline_run["cpu_s"] / offline_run["tokens"]
        gil_per_token = (run["engine_thread_cpu_s"] + run["event_loop_cpu_s"]) / run["tokens"]
        run["cpu_ratio"] = offline_per_token / gil_per_token  # the CPU the daemon spends against the offline engine
        # What bounds throughput where cores are free: one GIL (thread), or the busier of two processes (process).
        front_end = run["event_loop_cpu_s"] + (run["other_threads_cpu_s"] if run.get("engine_core") == "process"
                                               else run["engine_thread_cpu_s"])
        run["bound_ratio"] = offline_per_token / (max(run["engine_thread_cpu_s"], front_end) / run["tokens"])
        run["wall_ratio"] = run["output_tok_per_s"] / offline_run["output_tok_per_s"]
        if engine_text_run is not None:  # against the offline engine making its text token by token
            engine_text_per_token = engine_text_run["cpu_s"] / engine_text_run["tokens"]
            run["bound_ratio_engine_text"] = run["bound_ratio"] * engine_text_per_token / offline_per_token


def main(argv: list[str] | None = None) -> dict:
    if argv is None and sys.argv[1:2] == ["serve-stand-in"]:
        sys.exit(serve_stand_in(sys.argv[2:]))
    args = parse_args(argv)
    torch.set_num_threads(1)
    prompts = make_prompts(TINY["vocab_size"], args.num_requests, args.min_prompt, args.max_prompt, args.seed)
    workload = {k: getattr(args, k) for k in ("num_requests", "min_prompt", "max_prompt", "output_len", "clients",
                                              "seed")}
    facts = machine.machine_facts(python=platform.python_version(), torch=torch.__version__)
    result = dict(label=args.label, machine=facts, workload=workload, offline=None, offline_engine_text=None,
                  engine_core=[], without_grpc=[], daemon=[])
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = workdir / "model"
        write_model(model_dir, args.max_prompt + args.output_len)
        offline_digests = None
        if not args.skip_offline:
            result["offline"], offline_digests = offline(args, model_dir, prompts)
            result["offline"]["output_tok_per_s"] = result["offline"]["tokens"] / result["offline"]["wall_s"]
            print(f"offline: {result['offline']}", flush=True)
            result["offline_engine_text"] = offline_engine_text(args, model_dir, prompts)
            print(f"offline, text made in the engine: {result['offline_engine_text']}", flush=True)
            result["engine_core"] = [engine_core(args, model_dir, prompts, detokenize) for detokenize in (True, False)]
            print(f"engine core alone: {result['engine_core']}", flush=True)
            result["without_grpc"] = [without_grpc(args, model_dir, prompts, detokenize)
                                      for detokenize in (True, False)]
            print(f"without gRPC: {result['without_grpc']}", flush=True)
        for service, serve_args in [(s, a) for a in args.serve_args for s in args.services]:
            run, digests = daemon(args, model_dir, prompts, service, serve_args, workdir)
            if offline_digests is not None:
                run["tokens_equal_offline"] = all(digests.get(f"r{i}", ("",))[0] == d[0]
                                                  for i, d in enumerate(offline_digests))
                if service == "beastserve.v1":  # the VllmEngine service sends no text
                    run["text_equal_offline"] = all(digests.get(f"r{i}", ("", ""))[1] == d[1]
                                                    for i, d in enumerate(offline_digests))
            derive(result["offline"], run, result.get("offline_engine_text"))
            result["daemon"].append(run)
            print(f"daemon {service}: {run}", flush=True)
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_results(result, args.out, to_markdown)
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
