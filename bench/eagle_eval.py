"""An EAGLE head's acceptance through the engine, greedy, at a fixed depth, on held-out code and
held-out chat, with n-gram lookup and the shipped small draft on the same prompts:

    python -m bench.eagle_eval --model default --dtype float32 --out bench/results/eagle_eval_cpu.json

Held-out prompts are built as `distill-draft --kind eagle` builds them (code prompts from held-out
standard library and package files; chat prompts the target writes from held-out seeds and prose
prompts from held-out documentation), or read from a training run's data/held_out.jsonl
(--held-out), the same prompts its simulated report used. --eagle-head defaults to the head shipped
for the model; runs on CPU and GPU (--device).
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

from bench.offline_common import write_results
from scheduler import Engine, SamplingParams
from scheduler.distill.command import free_memory
from scheduler.distill.evaluate import acceptance

PROPOSERS = ("eagle", "draft", "ngram")


def held_out_prompts(args) -> dict[str, list[list[int]]]:
    """Prompt token ids per kind (code, chat)."""
    if args.held_out:
        from scheduler.distill.eagle_data import load_samples

        prompts: dict[str, list[list[int]]] = {}
        for s in load_samples(Path(args.held_out)):
            prompts.setdefault(s.kind, []).append(s.token_ids[:s.num_prompt_tokens])
        return {kind: p[:args.prompts] for kind, p in prompts.items()}
    from scheduler.distill.eagle_data import held_out_prompts as build
    from scheduler.distill.sources import load_local_data, local_data
    from scheduler.llm import LLM

    llm = LLM(args.model, device=args.device, dtype=args.dtype)
    local = load_local_data(Path(args.prompts_from)) if args.prompts_from else local_data(max_files=args.max_files)
    chats = build(llm, local, args.prompts, 64)
    prompts = {kind: [llm.engine.inputs.render_chat(c) for c in convs] for kind, convs in chats.items()}
    del llm  # and its KV cache, before the evaluations' engines plan their own
    free_memory()
    return prompts


def acceptance_line(figures: dict) -> str:
    """An acceptance report (scheduler.distill.evaluate.acceptance's figures) in one line."""
    return (f"{figures['per_drafted_token']:.3f} of drafted tokens, {figures['accepted_per_step']:.2f} per step; "
            f"by position {figures['per_position']}")


def head_arguments(doc: str, dtype: str) -> argparse.ArgumentParser:
    """A parser with the target, its head and the dtype they run in."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--eagle-head", default=None, help="default: the head shipped for --model")
    parser.add_argument("--dtype", default=dtype)
    return parser


def main(argv=None) -> None:
    parser = head_arguments(__doc__, "auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--k", type=int, default=4, help="tokens drafted per step (fixed)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts of each kind")
    parser.add_argument("--max-files", type=int, default=4000, help="source files read for held-out code prompts")
    parser.add_argument("--prompts-from", default=None, help="a prompts file (distill-draft --stage data): its "
                                                             "held-out prompts, rather than reading local files")
    parser.add_argument("--held-out", default=None, help="a training run's data/held_out.jsonl: its prompts")
    parser.add_argument("--proposers", default=",".join(PROPOSERS))
    parser.add_argument("--out", default=None, help="JSON file for the result")
    args = parser.parse_args(argv)
    prompts = held_out_prompts(args)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    result = {"model": args.model, "dtype": args.dtype, "k": args.k, "max_tokens": args.max_tokens,
              "prompts": {kind: len(p) for kind, p in prompts.items()}, "machine": platform.processor() or "?",
              "acceptance": {}}
    for name in args.proposers.split(","):
        options = {"eagle_head": args.eagle_head} if name == "eagle" else {}
        try:
            engine = Engine(model=args.model, dtype=args.dtype, device=args.device, speculative=name,
                            num_speculative_tokens=args.k, adaptive_speculation=False, **options)
        except ValueError as exc:  # e.g. no head or draft shipped for this model
            print(f"{name}: {exc}")
            continue
        result["device"] = str(engine.device)
        result["acceptance"][name] = {kind: acceptance(engine, p, params) for kind, p in prompts.items()}
        del engine
        free_memory()
        for kind, acc in result["acceptance"][name].items():
            print(f"{name:6s} {kind:5s} accepted {acceptance_line(acc)}", flush=True)
    if args.out:
        write_results(result, Path(args.out))


if __name__ == "__main__":
    main()
