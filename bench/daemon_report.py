"""bench/daemon_vs_offline.py's results as markdown."""

from __future__ import annotations

DAEMON_HEADER = ("| service | flags | tok/s (wall) | wall ratio | CPU ratio | bound ratio | bound ratio, offline text "
                 "made in the engine | CPU s/1k tok: engine "
                 "thread (or core process) | event loop | other threads | tokens/message | clients' CPU s | errors "
                 "| tokens = offline | text = offline |")


def to_markdown(result: dict) -> str:
    m, w, off = result["machine"], result["workload"], result["offline"]
    label = f": {result['label']}" if result["label"] else ""
    lines = [f"# Daemon against the offline engine, unbounded load (CPU){label}", "",
             f"{m['date']} · {m['cpu']} ({m['logical_cores']} cores, load {m['load_average_at_start']} at start, "
             f"{m.get('load_average_at_end')} at end) · Python {m['python']} · torch {m['torch']}", "",
             f"{w['num_requests']} requests at once, prompts U({w['min_prompt']}, {w['max_prompt']}) random ids, "
             f"{w['output_len']} output tokens, greedy, EOS ignored; {w['clients']} client processes.", ""]
    if off is not None:
        lines += [f"Offline engine: {off['tokens']} tokens, {off['output_tok_per_s']:.0f} tok/s wall, "
                  f"{1e3 * off['cpu_s'] / off['tokens']:.3f} CPU s per 1k tokens (model stand-in "
                  f"{1e3 * off['model_cpu_s'] / off['tokens']:.3f} of them).", ""]
    if result.get("offline_engine_text"):
        e = result["offline_engine_text"]
        lines += ["Offline engine with its text made in the engine, token by token: "
                  f"{1e3 * e['cpu_s'] / e['tokens']:.3f} CPU s per 1k tokens.", ""]
    lines += [DAEMON_HEADER, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---|"]
    lines += [_daemon_row(r) for r in result["daemon"]]
    gc_lines = [f"- {r['service']} ({_flags(r)}): {r['gc']['passes']} passes, {r['gc']['seconds']} s"
                for r in result["daemon"] if r.get("gc")]
    if gc_lines:
        lines += ["", "The daemon's garbage collector while the clients ran, by generation (0, 1, 2):", "", *gc_lines]
    if result.get("engine_core"):
        lines += ["", "Engine core alone (what a process of its own would do: every step's deltas, packed and pickled "
                  "as one message a step; no front end):", "",
                  "| text | CPU s/1k tok | message bytes/token | CPU ratio to offline |", "|---|---:|---:|---:|"]
        for r in result["engine_core"]:
            per_1k = 1e3 * r["cpu_s"] / r["tokens"]
            ratio = f"{off['cpu_s'] / off['tokens'] * 1e3 / per_1k:.2f}" if off else "—"
            lines.append(f"| {'yes' if r['detokenize'] else 'no'} | {per_1k:.3f} | "
                         f"{r['message_bytes'] / r['tokens']:.1f} | {ratio} |")
    if result.get("without_grpc"):
        lines += ["", "Without gRPC (AsyncEngine's thread and its hop to a uvloop whose tasks take the outputs and "
                  "send nothing):", "", "| text | CPU s/1k tok: engine thread | event loop | tokens per take |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {'yes' if r['detokenize'] else 'no'} | {r['cpu_s_per_1k_tokens']['engine_thread']:.3f} | "
                  f"{r['cpu_s_per_1k_tokens']['event_loop']:.3f} | {r['tokens_per_take']:.2f} |"
                  for r in result["without_grpc"]]
    return "\n".join(lines) + "\n"


def _daemon_row(r: dict) -> str:
    c = r["cpu_s_per_1k_tokens"]
    return (f"| {r['service']} | {_flags(r)} | {r['output_tok_per_s']:.0f} | {_ratio(r, 'wall_ratio')} | "
            f"{_ratio(r, 'cpu_ratio')} | {_ratio(r, 'bound_ratio')} | {_ratio(r, 'bound_ratio_engine_text')} | "
            f"{c['engine_thread']:.3f} | "
            f"{c['event_loop']:.3f} | {c['other_threads']:.3f} | "
            f"{r['tokens_per_message']:.2f} | {r['clients_cpu_s']} | {r['num_errors']} | "
            f"{r.get('tokens_equal_offline', '—')} | {r.get('text_equal_offline', '—')} |")


def _flags(run: dict) -> str:
    return run.get("serve_args") or "defaults"


def _ratio(run: dict, key: str) -> str:
    return f"{run[key]:.2f}" if key in run else "—"
