"""Tensor operations an engine step dispatches outside the model's forward, on the CPU: what a GPU would launch one
by one beside its CUDA graphs (the target's forward and an EAGLE head's proposal are one replay each there, and
are left out here). Each is a kernel launch the host queues, ~5-10 µs apiece on a GPU host; at batch 1, where a
step of a small model takes ~1 ms, a hundred of them are the difference between speculation paying and not.

One request decoding (a tiny random Llama, greedy, EOS ignored), the steps after its first three counted with a
TorchDispatchMode, views (which launch nothing) left out; the CPU's n-gram lookup is the eager form of what CUDA
runs as one Triton kernel, so its operations are counted apart.

    PYTHONPATH=. python3 -m bench.device_ops [--modes off,ngram-fixed-k,...] [--where]
"""

from __future__ import annotations

import argparse
import collections
import random
import tempfile
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scheduler import Engine, SamplingParams

MODES = {
    "off": dict(speculative="off"),
    "ngram-fixed-k": dict(speculative="ngram", adaptive_speculation=False),
    "ngram-fixed-k-loop": dict(speculative="ngram", adaptive_speculation=False, speculation_in_loop=True),
    "eagle-fixed-k": dict(speculative="eagle", adaptive_speculation=False),
    "eagle-fixed-k-loop": dict(speculative="eagle", adaptive_speculation=False, speculation_in_loop=True),
}
LOOKUP = "scheduler/speculative/ngram_device.py"


class OpCounter(TorchDispatchMode):
    """Counts the operations dispatched while `on`, by the scheduler line that issued them where asked."""

    def __init__(self, where: bool):
        super().__init__()
        self.on, self.where, self.count, self.lines = False, where, 0, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on and not _is_view(func):  # a view launches nothing
            self.count += 1
            frames = [f for f in traceback.extract_stack()[:-2] if "/scheduler/" in f.filename]
            if frames:
                self.lines[f"{frames[-1].filename.split('/scheduler/', 1)[1]}:{frames[-1].lineno}"] += 1
        return func(*args, **(kwargs or {}))

    def outside(self, fn):
        """fn, its operations not counted."""
        def run(*args, **kwargs):
            was, self.on = self.on, False
            try:
                return fn(*args, **kwargs)
            finally:
                self.on = was
        return run


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write


def build_models(root: Path) -> tuple[Path, Path]:
    """A tiny random Llama (no tokenizer: token-id prompts) and an untrained EAGLE head for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from scheduler.speculative.draft import compact
    from scheduler.speculative.eagle import files
    from scheduler.speculative.eagle.head import EagleHead

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=None, pad_token_id=None, eos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "model")
    head = EagleHead.for_target(config).bind(model.model.embed_tokens.weight.detach(), model.lm_head.weight.detach())
    files.save_head(head, root / "head", {"target": "tiny", "command": "bench/device_ops.py",
                                          "target_fingerprint": compact.target_fingerprint(model)})
    return root / "model", root / "head"


def count(mode: str, model: Path, head: Path, steps: int, k: int, where: bool) -> dict:
    options = dict(MODES[mode], num_speculative_tokens=k)
    if options["speculative"] == "eagle":
        options["eagle_head"] = str(head)
    engine = Engine(model=str(model), dtype="float32", **options)
    counter = OpCounter(where)
    engine.model.forward = counter.outside(engine.model.forward)
    if options["speculative"] == "eagle":
        runner = engine.speculator.proposer.runner
        for name in ("chain", "chain_after", "greedy_proposal"):
            setattr(runner, name, counter.outside(getattr(runner, name)))
    rng = random.Random(0)
    engine.add_request(None, SamplingParams(temperature=0, max_tokens=steps * (k + 1) + 8, ignore_eos=True),
                       prompt_token_ids=[rng.randrange(512) for _ in range(100)])
    for _ in range(3):
        engine.step()
    with counter:
        counter.on = True
        for _ in range(steps):
            engine.step()
        counter.on = False
    lookup = sum(n for line, n in counter.lines.items() if line.startswith(LOOKUP.split("scheduler/", 1)[1]))
    result = {"mode": mode, "steps": steps, "ops_per_step": counter.count / steps, "lookup_ops_per_step":
              lookup / steps}
    if where:
        result["by_line"] = {line: n / steps for line, n in counter.lines.most_common(25)}
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--where", action="store_true", help="also count by the scheduler line that issued them")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model, head = build_models(Path(tmp))
        for mode in args.modes.split(","):
            r = count(mode, model, head, args.steps, args.k, args.where)
            results.append(r)
            print(f"{mode:20s} {r['ops_per_step']:6.1f} operations a step ({r['lookup_ops_per_step']:.1f} of them the "
                  f"n-gram lookup)", flush=True)
            for line, n in r.get("by_line", {}).items():
                print(f"    {n:6.1f}  {line}")
    return results


if __name__ == "__main__":
    main()
