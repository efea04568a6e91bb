"""What buys an EAGLE head the most per CPU minute: heads trained for the same number of steps on one
run's cached features (`distill-draft --kind eagle` with the CPU's disk cache, DIR/data/features),
each changing one setting of a base one, judged by simulated held-out acceptance (depth 4, greedy),
with the CPU seconds each took (process time: on a shared machine wall time says little):

    python -m bench.eagle_ablate RUN_DIR --steps 40 --out bench/results/distill_eagle_ablation_cpu.json

Variants: the base (unroll 4, lr 1e-3, 8,192-token draft vocabulary, 2,048-token batches, every kind
of sample), lr 3e-3, unroll 2, a 4,096-token vocabulary, 1,024-token batches, answers only (no raw
text), raw text only (no answers). Only settings that need no new reading of the target are compared.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from scheduler.distill.eagle_evaluate import simulated_report
from scheduler.distill.eagle_train import HeadTrainConfig, batches_for_epoch, train_head
from scheduler.distill.features import as_sample, read_cached
from scheduler.distill.train import hf_model
from scheduler.distill.vocab import answer_token_counts, frequent_tokens
from scheduler.speculative.eagle.head import EagleHead
from scheduler.worker.models import load_model

BASE = {"unroll": 4, "lr": 1e-3, "vocab": 8192, "batch_tokens": 2048, "kinds": None}
VARIANTS = {"base": {}, "lr3e-3": {"lr": 3e-3}, "unroll2": {"unroll": 2}, "vocab4096": {"vocab": 4096},
            "batch1024": {"batch_tokens": 1024}, "answers_only": {"kinds": ("code", "chat", "prose")},
            "text_only": {"kinds": ("text",)}}
# Steps are counted in base batches: batch1024 makes twice as many of its half-size ones.


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a distill-draft --kind eagle --out directory (its data/ cache)")
    parser.add_argument("--target", default="default")
    parser.add_argument("--steps", type=int, default=40, help="training steps of each variant")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    run = Path(args.run)
    features, held = read_cached(run / "data" / "features"), read_cached(run / "data" / "held_out_features")
    target = load_model(args.target, None, "auto", torch.float32, torch.device("cpu"), None)
    teacher = hf_model(target.model, torch.device("cpu"), torch.float32)
    counts = answer_token_counts([as_sample(f) for f in features], teacher.config.vocab_size)
    results = {"run": str(run), "steps_each": args.steps, "train_tokens": sum(len(f.token_ids) for f in features),
               "variants": {}}
    for name in args.variants.split(","):
        setting = dict(BASE, **VARIANTS[name])
        chosen = [f for f in features if setting["kinds"] is None or f.kind in setting["kinds"]]
        torch.manual_seed(0)
        head = EagleHead.for_target(teacher.config, None, target.max_positions)
        vocab = torch.tensor(frequent_tokens(counts, setting["vocab"]))
        head.bind(teacher.model.embed_tokens.weight, teacher.lm_head.weight, vocab)
        per_epoch = len(batches_for_epoch([len(f.token_ids) for f in chosen], setting["batch_tokens"], 0, 0))
        config = HeadTrainConfig(unroll=setting["unroll"], lr=setting["lr"], batch_tokens=setting["batch_tokens"],
                                 epochs=args.steps * BASE["batch_tokens"] / setting["batch_tokens"] / per_epoch,
                                 checkpoint_seconds=1e9)
        start, cpu = time.monotonic(), time.process_time()
        stats = train_head(head, chosen, config, Path(tempfile.mkdtemp()), show_progress=False)
        cpu = time.process_time() - cpu
        report = simulated_report(head, held, 4)
        results["variants"][name] = {"setting": {k: v for k, v in setting.items()}, "train": stats,
                                     "seconds": round(time.monotonic() - start, 1), "cpu_seconds": round(cpu, 1),
                                     "held_out": {k: {"per_drafted_token": r["per_drafted_token"],
                                                      "accepted_per_step": r["accepted_per_step"]}
                                                  for k, r in report.items()}}
        print(name, json.dumps(results["variants"][name]["held_out"]), stats["steps"], "steps", round(cpu), "cpu s",
              flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
