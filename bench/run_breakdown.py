"""Where a whole offline run's time goes, from the engine's own step stats: the steps that carry prompt chunks (the
ramp-up, and later admissions as requests end), the decoding steps at full width, the tail where fewer and fewer
sequences remain, and what preemption cost (prompt tokens computed again). A throughput gap that steady decoding
does not explain shows here: a long prefill phase, a batch held narrow by the KV cache, a slow tail.

    with StepRecorder(llm.engine) as steps:
        llm.generate(...)
    breakdown(steps.stats, prompt_tokens=sum(map(len, prompts)))
"""

from __future__ import annotations

from scheduler.core.outputs import StepStats

TAIL_SHARE = 0.5  # a decoding step with fewer running sequences than this share of the most: the tail


class StepRecorder:
    """The StepStats of every engine step while the block runs (Engine.step wrapped on the instance)."""

    def __init__(self, engine):
        self.engine, self.stats = engine, []

    def __enter__(self) -> StepRecorder:
        step = self.engine.step

        def recorded():
            outputs = step()
            self.stats.append(self.engine.last_step_stats)
            return outputs

        self.engine.step = recorded
        return self

    def __exit__(self, *exc) -> None:
        del self.engine.step  # the class's again


def breakdown(stats: list[StepStats], prompt_tokens: int) -> dict:
    """Phases of a run by step: steps with prompt chunks, decoding steps with at least TAIL_SHARE of the most
    sequences that ever ran at once, and the tail below it. Seconds are the steps' own wall times."""
    peak = max((s.num_running for s in stats), default=0)
    phases = {name: dict(steps=0, seconds=0.0, output_tokens=0, prompt_tokens=0, running=0)
              for name in ("with prompt chunks", "decoding, full", "decoding, tail")}
    for s in stats:
        if s.num_prompt_tokens:
            name = "with prompt chunks"
        elif s.num_running >= TAIL_SHARE * peak:
            name = "decoding, full"
        else:
            name = "decoding, tail"
        phase = phases[name]
        phase["steps"] += 1
        phase["seconds"] += s.step_s
        phase["output_tokens"] += s.num_generation_tokens
        phase["prompt_tokens"] += s.num_prompt_tokens
        phase["running"] += s.num_running
    for phase in phases.values():
        phase["mean_running"] = phase.pop("running") / phase["steps"] if phase["steps"] else 0.0
        phase["ms_per_step"] = 1e3 * phase["seconds"] / phase["steps"] if phase["steps"] else 0.0
    computed = sum(s.num_prompt_tokens for s in stats)
    return dict(steps=len(stats), seconds=sum(s.step_s for s in stats), peak_running=peak,
                kv_usage_max=max((s.kv_cache_usage for s in stats), default=0.0),
                preemptions=sum(s.num_preemptions for s in stats),
                prompt_tokens_recomputed=max(0, computed - prompt_tokens), phases=phases)


def to_markdown(b: dict) -> list[str]:
    lines = [f"Whole run by step ({b['steps']} steps, {b['seconds']:.1f} s of steps; at most {b['peak_running']} "
             f"sequences at once, KV cache at most {100 * b['kv_usage_max']:.0f}% used; {b['preemptions']} "
             f"preemptions, {b['prompt_tokens_recomputed']:,} prompt tokens computed again):", "",
             "| phase | steps | s | ms/step | mean running | output tokens | prompt tokens |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, p in b["phases"].items():
        lines.append(f"| {name} | {p['steps']} | {p['seconds']:.2f} | {p['ms_per_step']:.2f} | "
                     f"{p['mean_running']:.0f} | {p['output_tokens']:,} | {p['prompt_tokens']:,} |")
    return lines + [""]
