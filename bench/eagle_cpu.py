"""The EAGLE proposer on the default model, CPU, float32, greedy: outputs identical to speculation off,
and what the head's work costs a step. The head is trained here by a short loop (training-time test on
the target's own greedy answers to a few chat prompts), so its acceptance says little; a head made by
`distill-draft` is what acceptance is measured with (`--head DIR` uses one).

    python -m bench.eagle_cpu --train-steps 40 --k 4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from scheduler import LLM, SamplingParams
from scheduler.distill.train import hf_model
from scheduler.speculative.draft.compact import target_fingerprint
from scheduler.speculative.eagle.files import save_head
from scheduler.speculative.eagle.head import EagleHead, aux_hidden_states

PROMPTS = ["Write a haiku about autumn.", "Explain what a hash map is.", "List three uses of Python.",
           "How do I reverse a list in Python?", "What is the capital of Japan?", "Give me a short story idea.",
           "Summarise the plot of Hamlet in two sentences.", "What does HTTP stand for?"]


def train_short(llm: LLM, steps: int, unroll: int):
    target = hf_model(llm.engine.model, torch.device("cpu"), torch.float32)
    head = EagleHead.for_target(target.config).bind(target.model.embed_tokens.weight, target.lm_head.weight)
    answers = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS],
                       [SamplingParams(temperature=0, max_tokens=96)] * len(PROMPTS))
    sequences = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in answers]
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for step in range(steps):
        ids = torch.tensor([sequences[step % len(sequences)]])
        with torch.no_grad():
            out = target(ids, output_hidden_states=True)
        aux, picks = aux_hidden_states(out.hidden_states, head.layer_ids), out.logits.argmax(-1)
        length, loss = ids.shape[1], 0
        for s, hidden in enumerate(head.unroll(ids, aux, unroll)):
            rows = length - 2 - s
            loss = loss + F.cross_entropy(head.logits(hidden[:, :rows])[0], picks[0, 1 + s:1 + s + rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head, target


def timed(proposer, spent: list[float]) -> None:
    """Add the seconds the proposer's own calls take (drafting, storing features) to spent[0]."""
    for name in ("propose", "observe_forward"):
        call = getattr(proposer, name)

        def wrapper(*args, _call=call):
            start = time.perf_counter()
            try:
                return _call(*args)
            finally:
                spent[0] += time.perf_counter() - start
        setattr(proposer, name, wrapper)


def timed_run(llm: LLM, params: SamplingParams, spent: list[float]) -> dict:
    """One prompt at a time (concurrency 1): outputs, ms per step, per output token, in the proposer."""
    steps, step_s, outputs, drafted, accepted = 0, 0.0, [], 0, 0
    spent[0], start = 0.0, time.perf_counter()
    for prompt in PROMPTS:
        stream = llm.engine.add_request(None, params, prompt_token_ids=llm.engine.tokenizer.encode(prompt))
        while not stream.finished:
            llm.engine.step()
            steps += 1
            step_s += llm.engine.last_step_stats.step_s
        deltas = list(iter(stream.get_nowait, None))
        outputs.append([t for d in deltas for t in d.token_ids])
        drafted, accepted = drafted + deltas[-1].metrics.draft_tokens, accepted + deltas[-1].metrics.accepted_tokens
    tokens = sum(len(o) for o in outputs)
    return {"outputs": outputs, "ms_step": 1000 * step_s / steps, "ms_token": 1000 * (time.perf_counter() - start) /
            tokens, "ms_proposer": 1000 * spent[0] / steps, "steps": steps,
            "acceptance": accepted / drafted if drafted else None}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", help="an EAGLE head directory (default: one trained here by a short loop)")
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    params = SamplingParams(temperature=0, max_tokens=args.output_len)
    off = LLM("default", dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        head_dir = args.head
        if head_dir is None:
            started = time.perf_counter()
            head, target = train_short(off, args.train_steps, min(args.k, 3))
            head_dir = f"{tmp}/head"
            size = save_head(head, head_dir, {"target": "default", "target_fingerprint": target_fingerprint(target),
                                              "command": f"bench/eagle_cpu.py --train-steps {args.train_steps}"})
            print(f"# head: {args.train_steps} steps in {time.perf_counter() - started:.0f} s, {size / 2**20:.1f} MiB")
        on = LLM("default", dtype="float32", speculative="eagle", eagle_head=head_dir,
                 num_speculative_tokens=args.k, adaptive_speculation=False)
        spent = [0.0]
        timed(on.engine.speculator.proposer, spent)
        print("| mode | ms/step | ms/token | proposer ms/step | steps | acceptance |\n|---|---|---|---|---|---|")
        reference = None
        for name, llm in (("off", off), (f"eagle k={args.k}", on)):
            runs = [timed_run(llm, params, spent) for _ in range(args.repeats)]
            outputs = runs[0]["outputs"]
            reference = reference or outputs
            assert all(r["outputs"] == outputs for r in runs) and outputs == reference, f"{name}: outputs differ"
            acc = runs[0]["acceptance"]
            print(" | ".join([f"| {name}"] + [f"{statistics.median(r[key] for r in runs):.1f}"
                                              for key in ("ms_step", "ms_token", "ms_proposer")] +
                             [str(runs[0]["steps"]), "-" if acc is None else f"{acc:.2f} |"]), flush=True)
        print(f"# outputs identical to speculation off: {len(reference)} prompts, {sum(map(len, reference))} tokens")


if __name__ == "__main__":
    main()
