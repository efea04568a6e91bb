"""A draft model's held-out evaluation (scheduler.distill.evaluate) on this benchmark's prompts:
acceptance per position, greedy and at temperature 0.7, and time per output token at concurrency
1 drafting 1..k tokens a step against no speculation, with the outputs checked unchanged.

    python -m bench.draft_eval --model default --dtype float32 --out bench/results/draft_eval_gpu.json

--draft-model defaults to the draft shipped for the target (scheduler/drafts/).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.speculative import CHAT_TASKS, COPY_TASKS
from scheduler.distill import compact
from scheduler.distill.evaluate import evaluate, format_report
from scheduler.models import load_model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--draft-model", default=None, help="default: the draft shipped for --model")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", default=None, help="JSON file for the result")
    args = parser.parse_args(argv)
    draft = args.draft_model
    if draft is None:
        import torch

        target = load_model(args.model, None, "auto", torch.float32, torch.device("cpu"), None)
        draft = compact.shipped_draft_for(target)
        if draft is None:
            parser.error(f"--draft-model: no draft shipped for {args.model}")
    chats = [[{"role": "user", "content": t}] for t in CHAT_TASKS + COPY_TASKS]
    result = evaluate(args.model, str(draft), chats, k=args.k, max_tokens=args.max_tokens,
                      num_speed_prompts=len(chats), device=args.device, dtype=args.dtype)
    result.update(model=args.model, draft_model=str(draft), dtype=args.dtype)
    print(format_report(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
