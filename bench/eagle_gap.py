"""Does the engine lose acceptance the EAGLE head has? The engine answers prompts greedily at a fixed depth
while every proposal it makes is recorded (the sequence length it drafted from and its drafts); then the
head is teacher-forced over the very sequences the engine produced (prompt + greedy answer), the way the
distillation's simulation judges it (EagleHead.unroll over the target's transformers forward), and three
figures are set side by side for each set of prompts:

- simulated, every position: chains from every answer position, as eval.json reports;
- simulated, at the engine's steps: the same chains, only where the engine started a step;
- the engine: what its own drafts achieved at those steps.

The last two judge the same chains: a gap between them is the serving path's, one between the first two
is where steps start (a step starts after a rejection, where drafting is harder). `drafts_equal` counts
the engine's drafts that equal the teacher-forced head's (compared up to the first rejected one, past
near ties).
--heads DIR,... adds, per set, the simulated figure (every position) of other heads on the same sequences
(e.g. the same weights kept in another precision, or without their draft vocabulary): what they would
change, without running the engine again.

    OMP_NUM_THREADS=1 python -m bench.eagle_gap --held-out bench/data/eagle_held_out.jsonl --prompts 8 \\
        --out bench/results/eagle_gap_cpu.json
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from bench.eagle_eval import acceptance_line, head_arguments
from bench.offline_common import write_results
from scheduler import Engine, SamplingParams
from scheduler.distill.train import hf_model
from scheduler.speculative.eagle import files
from scheduler.speculative.eagle.head import aux_hidden_states
from scheduler.worker.models.loader import LoadedModel


def record_proposals(engine: Engine) -> list:
    """(prompt, num_tokens, drafts) of every proposal the engine's EAGLE proposer makes from now on."""
    proposer, seen = engine.speculator.proposer, []
    propose = proposer.propose

    def spy(spec, pool):
        proposal = propose(spec, pool)
        drafts = proposal.device_drafts.tolist()
        seen.extend((tuple(s.request.prompt_token_ids), s.request.num_tokens, drafts[r]) for r, s in enumerate(spec))
        return proposal

    proposer.propose = spy
    return seen


def answer(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], list]:
    """The engine's answers to prompts (run together, each a different prompt) and its proposals, by prompt."""
    seen = record_proposals(engine)
    streams = [engine.add_request(None, params, prompt_token_ids=p) for p in prompts]
    outputs = {s.request_id: [] for s in streams}
    while not all(s.finished for s in streams):
        engine.step()
        for s in streams:
            for delta in iter(s.get_nowait, None):
                outputs[s.request_id] += delta.token_ids
    del engine.speculator.proposer.propose  # the class's again
    by_prompt = {tuple(p): [] for p in prompts}
    for prompt, num_tokens, drafts in seen:
        by_prompt[prompt].append((num_tokens, drafts))
    return [outputs[s.request_id] for s in streams], [by_prompt[tuple(p)] for p in prompts]


def _leading(drafts: list[int], sequence: list[int], at: int) -> int:
    """How many of drafts (for positions at, at + 1, ...) the greedy sequence took in a row."""
    n = 0
    while n < len(drafts) and at + n < len(sequence) and drafts[n] == sequence[at + n]:
        n += 1
    return n


@torch.no_grad()
def teacher_forced(head, teacher, sequence: list[int], depth: int) -> torch.Tensor:
    """[depth, len(sequence)]: column i is the chain of drafts that starts at row i (reading token i + 1)."""
    ids = torch.tensor([sequence])
    out = teacher(ids, output_hidden_states=True)
    steps = head.unroll(ids, aux_hidden_states(out.hidden_states, head.layer_ids), depth)
    picks = [head.token_ids(head.logits(h[0]).float().argmax(-1)) for h in steps]
    return torch.stack(picks)


def simulated(head, teacher, prompts, outputs, depth: int) -> torch.Tensor:
    """Accepted chains by position (unconditional counts) from every answer position, and how many."""
    accepted, chains = torch.zeros(depth), 0
    for prompt, answer_ids in zip(prompts, outputs):
        sequence = prompt + answer_ids
        picks = teacher_forced(head, teacher, sequence, depth).tolist()
        for i in range(len(prompt) - 1, len(sequence) - 1 - depth):
            accepted[:_leading([picks[s][i] for s in range(depth)], sequence, i + 2)] += 1
            chains += 1
    return accepted, chains


def figures(accepted: torch.Tensor, chains: int) -> dict:
    per_position = (accepted / max(chains, 1)).tolist()
    return {"chains": chains, "per_position": [round(a, 4) for a in per_position],
            "per_drafted_token": round(sum(per_position) / len(per_position), 4),
            "accepted_per_step": round(sum(per_position), 3)}


@torch.no_grad()
def difficulty(head, teacher, prompts, outputs) -> dict:
    """How hard the answers are to draft: the share of answer tokens the head can propose at all (its draft
    vocabulary) and the target's own mean probability of its greedy token there."""
    vocab = None if head.vocab_ids is None else set(head.vocab_ids.tolist())
    inside = confidence = total = 0
    for prompt, answer_ids in zip(prompts, outputs):
        probs = teacher(torch.tensor([prompt + answer_ids])).logits[0, len(prompt) - 1:-1].float().softmax(-1)
        confidence += probs.gather(1, torch.tensor(answer_ids)[:, None]).sum().item()
        inside += len(answer_ids) if vocab is None else sum(t in vocab for t in answer_ids)
        total += len(answer_ids)
    return {"in_draft_vocab": round(inside / total, 4), "target_greedy_prob": round(confidence / total, 4)}


def compare(head, teacher, prompts, outputs, proposals, depth: int) -> dict:
    """The three figures (per position, unconditional: the share of chains accepted up to there)."""
    sim_steps, engine, equal, chains_steps = torch.zeros(depth), torch.zeros(depth), [0, 0], 0
    for prompt, answer_ids, steps in zip(prompts, outputs, proposals):
        sequence = prompt + answer_ids
        picks = teacher_forced(head, teacher, sequence, depth).tolist()
        for num_tokens, drafts in steps:
            i = num_tokens - 2  # the row whose output drafts first: it reads the last known token
            if i >= len(sequence) - 1 - depth or len(drafts) != depth:
                continue  # a chain judged past the answer's end
            chain = [picks[s][i] for s in range(depth)]
            n_tf, n_engine = _leading(chain, sequence, num_tokens), _leading(drafts, sequence, num_tokens)
            sim_steps[:n_tf] += 1
            engine[:n_engine] += 1
            chains_steps += 1
            judged = min(n_engine, n_tf, depth - 1) + 1  # up to the first rejected draft
            equal[0] += sum(a == b for a, b in zip(drafts[:judged], chain[:judged]))
            equal[1] += judged

    return {"simulated_every_position": figures(*simulated(head, teacher, prompts, outputs, depth)),
            "simulated_at_engine_steps": figures(sim_steps, chains_steps),
            "engine": figures(engine, chains_steps), "drafts_equal": equal,
            "answer_tokens": sum(map(len, outputs)), "prompt_tokens": [len(p) for p in prompts],
            **difficulty(head, teacher, prompts, outputs)}


def prompt_sets(args, engine: Engine) -> dict[str, tuple[list[list[int]], bool]]:
    """name -> (prompt token ids, ignore_eos)."""
    sets = {}
    if args.held_out:
        from scheduler.distill.eagle_data import load_samples

        for s in load_samples(Path(args.held_out)):
            sets.setdefault(f"held-out {s.kind}", ([], False))[0].append(s.token_ids[:s.num_prompt_tokens])
        sets = {name: (p[:args.prompts], False) for name, (p, _) in sets.items()}
    if args.bench_tasks:
        from bench.speculative import CHAT_TASKS, CODE_TASKS

        for name, tasks in (("bench.speculative chat", CHAT_TASKS), ("bench.speculative code", CODE_TASKS)):
            sets[name] = ([engine.inputs.render_chat([{"role": "user", "content": t}]) for t in tasks], True)
    return sets


def main(argv=None) -> None:
    parser = head_arguments(__doc__, "float32")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--held-out", default=None, help="a training run's data/held_out.jsonl: its prompts")
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts of each kind")
    parser.add_argument("--max-tokens", type=int, default=128, help="answer tokens (bench.speculative's: 64)")
    parser.add_argument("--bench-tasks", action="store_true", help="bench.speculative's chat and code prompts too, "
                                                                   "64 tokens, ignore_eos, as it runs them")
    parser.add_argument("--heads", default=None, help="other heads (directories, comma-separated) simulated on the "
                                                       "same sequences")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    engine = Engine(model=args.model, dtype=args.dtype, device="cpu", speculative="eagle", eagle_head=args.eagle_head,
                    num_speculative_tokens=args.k, adaptive_speculation=False)
    head = engine.speculator.proposer.head
    teacher = hf_model(engine.model, torch.device("cpu"), torch.float32)
    target = LoadedModel(engine.model_config, engine.tokenizer, engine.model, engine.max_model_len)
    others = {path: files.load_head(path, target, torch.float32, torch.device("cpu"))
              for path in (args.heads.split(",") if args.heads else [])}
    result = {"model": args.model, "dtype": args.dtype, "k": args.k, "date": time.strftime("%Y-%m-%d %H:%M UTC"),
              "machine": platform.processor() or platform.machine(), "sets": {}}
    for name, (prompts, ignore_eos) in prompt_sets(args, engine).items():
        max_tokens = 64 if ignore_eos else args.max_tokens
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos)
        outputs, proposals = answer(engine, prompts, params)
        r = compare(head, teacher, prompts, outputs, proposals, args.k)
        r["other_heads"] = {path: figures(*simulated(other, teacher, prompts, outputs, args.k))
                            for path, other in others.items()}
        result["sets"][name] = r
        print(f"{name}: {len(prompts)} prompts, {r['answer_tokens']} answer tokens ({r['in_draft_vocab']:.3f} in the "
              f"draft vocabulary, the target's greedy token at p {r['target_greedy_prob']:.3f}), drafts equal "
              f"{r['drafts_equal'][0]}/{r['drafts_equal'][1]}", flush=True)
        for what in ("simulated_every_position", "simulated_at_engine_steps", "engine"):
            print(f"  {what:26s} {acceptance_line(r[what])} ({r[what]['chains']} chains)", flush=True)
        for path, f in r["other_heads"].items():
            print(f"  simulated, {path}: {acceptance_line(f)}", flush=True)
    if args.out:
        write_results(result, Path(args.out))


if __name__ == "__main__":
    main()
