"""How well a draft serves its target, on prompts it was not trained on: the acceptance rate at each
draft position (greedy and sampled), and the time per output token it gives at concurrency 1."""

from __future__ import annotations

from dataclasses import replace

from scheduler.core.params import SamplingParams
from scheduler.loop.engine import Engine

EVAL_TEMPERATURES = (0.0, 0.7)


def acceptance(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> dict:
    """Run the prompts together; per position i, the share of drafts accepted there among those that
    got there (every earlier draft accepted), and the share of all drafted tokens accepted."""
    seeded = [params if params.seed is None else replace(params, seed=params.seed + i) for i in range(len(prompts))]
    streams = [engine.add_request(None, q, prompt_token_ids=p) for p, q in zip(prompts, seeded)]
    accepted, verified, drafted = [], [], 0
    while not all(s.finished for s in streams):
        engine.step()
        stats = engine.last_step_stats
        drafted += stats.num_draft_tokens
        accepted = _add(accepted, stats.accepted_per_position)
        verified = _add(verified, stats.verified_per_position)
    return {"per_position": [round(a / v, 4) if v else None for a, v in zip(accepted, verified)],
            "per_drafted_token": round(sum(accepted) / drafted, 4) if drafted else None,
            "accepted_per_step": round(sum(accepted) / verified[0], 3) if verified else None,
            "drafted_tokens": drafted}


def _add(totals: list[int], counts: list[int]) -> list[int]:
    totals = totals + [0] * (len(counts) - len(totals))
    return [t + (counts[i] if i < len(counts) else 0) for i, t in enumerate(totals)]


def _run_alone(engine: Engine, prompt: list[int], params: SamplingParams, depth: int):
    """One request with nothing else in the engine, drafting `depth` tokens a step (0: no speculation)."""
    stream = engine.add_request(None, params, prompt_token_ids=prompt, speculative=depth > 0,
                                max_draft_tokens=depth or None)
    deltas = []
    while not stream.finished:
        engine.step()
        deltas += iter(stream.get_nowait, None)
    return [t for d in deltas for t in d.token_ids], deltas[-1].metrics


def speedup(engine: Engine, prompts: list[list[int]], max_tokens: int, k: int) -> dict:
    """Greedy answers one request at a time, without speculation and drafting 1..k tokens a step:
    time per output token (after the first) each way, and whether every output stayed the same."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    depths = range(k + 1)
    for depth in depths:  # warm-up
        _run_alone(engine, prompts[0], SamplingParams(temperature=0, max_tokens=8), depth)
    seconds = dict.fromkeys(depths, 0.0)
    tokens, same = 0, True
    for prompt in prompts:
        outputs = {}
        for depth in depths:
            outputs[depth], metrics = _run_alone(engine, prompt, params, depth)
            seconds[depth] += metrics.e2e_s - metrics.ttft_s
        tokens += len(outputs[0]) - 1
        same &= all(out == outputs[0] for out in outputs.values())
    ms = {depth: 1000 * seconds[depth] / max(tokens, 1) for depth in depths}
    best = min(depths[1:], key=ms.get)
    return {"concurrency": 1, "tpot_ms_off": round(ms[0], 3),
            "tpot_ms_by_k": {d: round(ms[d], 3) for d in depths[1:]}, "best_k": best,
            "tpot_ms_draft": round(ms[best], 3), "speedup": round(ms[0] / ms[best], 3) if ms[best] else None,
            "outputs_identical": same, "num_prompts": len(prompts), "output_tokens": tokens + len(prompts)}


def evaluate(target: str, draft_dir: str, conversations: list[list[dict]], *, k: int, max_tokens: int,
             num_speed_prompts: int, **engine_options) -> dict:
    """Acceptance per position at k drafted tokens (greedy and temperature 0.7) and the speed-up at
    concurrency 1 drafting 1..k tokens a step, with the draft in draft_dir serving `target` in our engine."""
    engine = Engine(model=target, speculative="draft", draft_model=draft_dir, num_speculative_tokens=k,
                    adaptive_speculation=False, **engine_options)
    prompts = [engine.inputs.render_chat(c) for c in conversations]
    result = {"k": k, "num_prompts": len(prompts), "max_tokens": max_tokens, "acceptance": {}}
    for temperature in EVAL_TEMPERATURES:
        name = "greedy" if temperature == 0 else f"temperature_{temperature}"
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=None if temperature == 0 else 1)
        result["acceptance"][name] = acceptance(engine, prompts, params)
    result["speed"] = speedup(engine, prompts[:num_speed_prompts], max_tokens, k)
    result["device"] = str(engine.device)
    return result


def format_report(result: dict) -> str:
    k = result["k"]
    lines = [f"held-out evaluation: {result['num_prompts']} prompts, up to {result['max_tokens']} tokens, k = {k}",
             f"{'':16s}" + "".join(f"{'pos ' + str(i + 1):>8s}" for i in range(k)) + f"{'per token':>11s}"]
    for name, acc in result["acceptance"].items():
        cells = "".join(f"{a:8.3f}" if a is not None else f"{'-':>8s}" for a in acc["per_position"])
        cells += f"{'-':>8s}" * (k - len(acc["per_position"]))
        total = acc["per_drafted_token"]
        lines.append(f"{name:16s}{cells}{total if total is None else f'{total:11.3f}'}")
    speed = result["speed"]
    by_k = ", ".join(f"k={d}: {ms:.2f}" for d, ms in speed["tpot_ms_by_k"].items())
    lines.append(f"concurrency 1, ms/token: off {speed['tpot_ms_off']:.2f}, {by_k}; best k={speed['best_k']}: "
                 f"{speed['speedup']:.2f}x; outputs {'identical' if speed['outputs_identical'] else 'DIFFERENT'}")
    return "\n".join(lines)
