"""A draft model's held-out evaluation (scheduler.distill.evaluate): acceptance per position,
greedy and at temperature 0.7, and time per output token at concurrency 1 drafting 1..k tokens a
step against no speculation, with the outputs checked unchanged. On this benchmark's prompts, or
with --held-out N on N prompts the target writes from the seeds distill-draft holds out.

    python -m bench.draft_eval --model default --dtype float32 --out bench/results/draft_eval_gpu.json

--draft-model defaults to the draft shipped for the target (scheduler/speculative/drafts/); --no-draft-vocab
evaluates it with its LM head over the whole vocabulary (its draft_vocab file left out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from bench.speculative import CHAT_TASKS, COPY_TASKS
from scheduler.distill.command import free_memory
from scheduler.distill.evaluate import evaluate, format_report
from scheduler.speculative.draft import compact
from scheduler.worker.models import load_model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--draft-model", default=None, help="default: the draft shipped for --model")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--held-out", type=int, default=0,
                        help="evaluate on this many prompts the target writes (as distill-draft does)")
    parser.add_argument("--speed-prompts", type=int, default=None, help="prompts timed (default: all)")
    parser.add_argument("--no-draft-vocab", action="store_true", help="ignore the draft's restricted vocabulary")
    parser.add_argument("--out", default=None, help="JSON file for the result")
    args = parser.parse_args(argv)
    draft = args.draft_model
    if draft is None:
        import torch

        target = load_model(args.model, None, "auto", torch.float32, torch.device("cpu"), None)
        draft = compact.shipped_draft_for(target)
        if draft is None:
            parser.error(f"--draft-model: no draft shipped for {args.model}")
    if args.held_out:
        from scheduler.distill.data import EVAL_SEED, write_prompts
        from scheduler.llm import LLM

        llm = LLM(args.model, device=args.device, dtype=args.dtype)
        chats = write_prompts(llm, args.held_out, EVAL_SEED)
        del llm  # and its KV cache, before the evaluation's engine plans its own
        free_memory()
    else:
        chats = [[{"role": "user", "content": t}] for t in CHAT_TASKS + COPY_TASKS]
    with tempfile.TemporaryDirectory() as tmp:
        used = draft
        if args.no_draft_vocab:
            used = shutil.copytree(draft, Path(tmp) / "draft", ignore=shutil.ignore_patterns(compact.VOCAB_FILE))
        result = evaluate(args.model, str(used), chats, k=args.k, max_tokens=args.max_tokens,
                          num_speed_prompts=args.speed_prompts or len(chats), device=args.device, dtype=args.dtype)
    vocab = compact.load_vocab(draft, 1 << 62) if not args.no_draft_vocab else None
    result.update(model=args.model, draft_model=str(draft), dtype=args.dtype,
                  prompts=f"{args.held_out} written by the target" if args.held_out else "the benchmark's",
                  draft_vocab=None if vocab is None else len(vocab))
    print(format_report(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
