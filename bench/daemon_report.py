"""bench/daemon_vs_offline.py's results as markdown."""

from __future__ import annotations


def to_markdown(result: dict) -> str:
    m, w, off = result["machine"], result["workload"], result["offline"]
    lines = [f"# Daemon against the offline engine, unbounded load (CPU){': ' + result['label'] if result['label'] else ''}",
             "",
             f"{m['date']} · {m['cpu']} ({m['logical_cores']} cores, load {m['load_average_at_start']} at start, "
             f"{m.get('load_average_at_end')} at end) · Python {m['python']} · torch {m['torch']}", "",
             f"{w['num_requests']} requests at once, prompts U({w['min_prompt']}, {w['max_prompt']}) random ids, "
             f"{w['output_len']} output tokens, greedy, EOS ignored; {w['clients']} client processes.", ""]
    if off is not None:
        lines += [f"Offline engine: {off['tokens']} tokens, {off['output_tok_per_s']:.0f} tok/s wall, "
                  f"{1e3 * off['cpu_s'] / off['tokens']:.2f} CPU s per 1k tokens (model stand-in "
                  f"{1e3 * off['model_cpu_s'] / off['tokens']:.2f} of them).", ""]
    lines += ["| service | tok/s (wall) | wall ratio | CPU ratio | CPU s/1k tok: engine thread | event loop | other "
              "threads | tokens/message | clients' CPU s | errors | tokens = offline |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in result["daemon"]:
        c = r["cpu_s_per_1k_tokens"]
        lines.append(f"| {r['service']} | {r['output_tok_per_s']:.0f} | {_ratio(r, 'wall_ratio')} | "
                     f"{_ratio(r, 'cpu_ratio')} | {c['engine_thread']:.2f} | {c['event_loop']:.2f} | "
                     f"{c['other_threads']:.2f} | {r['tokens_per_message']:.2f} | {r['clients_cpu_s']} | "
                     f"{r['num_errors']} | {r.get('tokens_equal_offline', '—')} |")
    return "\n".join(lines) + "\n"


def _ratio(run: dict, key: str) -> str:
    return f"{run[key]:.2f}" if key in run else "—"
