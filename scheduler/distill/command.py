"""`beastserve distill-draft` (also `python -m scheduler.distill`): make a draft model for a target
from the target's own answers, save it, and evaluate it on held-out prompts."""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from scheduler.config import EngineConfig
from scheduler.distill.data import TEMPERATURES, Sample, generate_samples, prompt_stream, read_prompts, split_prompts
from scheduler.distill.evaluate import evaluate, format_report
from scheduler.distill.train import LOSSES, TrainConfig, draft_layer_ids, hf_model, init_draft, train
from scheduler.distill.vocab import DEFAULT_SIZE, make_vocab, write_vocab
from scheduler.llm import LLM
from scheduler.speculative.draft.compact import save_compact, save_full, target_fingerprint
from scheduler.worker.models import load_model, resolve_model


def add_distill_args(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--kind", choices=("draft", "eagle"), default="draft",
                        help="draft: a small model made of the target's first layers; eagle: an EAGLE head that "
                             "drafts from the target's hidden states (default: %(default)s)")
    parser.add_argument("--target", default=env("BEASTSERVE_MODEL", "default"),
                        help="the model to make a draft for: 'default', a GGUF file or a Hugging Face directory "
                             "[BEASTSERVE_MODEL]")
    parser.add_argument("--out", required=True, help="directory to write the draft and eval.json into")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the draft (default: %(default)s)")
    parser.add_argument("--prompts", help="JSONL file of {\"prompt\": ...} or {\"messages\": [...]} lines; "
                                          "default: prompts the target writes itself")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="answer tokens to generate for training"
                                                                      " (default: %(default)s)")
    parser.add_argument("--max-minutes", type=float, default=10.0, help="wall-time cap on generation and training"
                                                                        " (default: %(default)s)")
    parser.add_argument("--generation-share", type=float, default=0.5,
                        help="most of --max-minutes that generating data may take (default: %(default)s)")
    parser.add_argument("--compact", action=argparse.BooleanOptionalAction, default=True,
                        help="store only the draft's own layers, borrowing the target's embeddings and LM head "
                             "(--no-compact: a self-contained Hugging Face directory) (default: %(default)s)")
    parser.add_argument("--device", default=env("BEASTSERVE_DEVICE", "auto"), help="auto, cpu or cuda[:N]"
                                                                                   " (default: %(default)s)")
    parser.add_argument("--dtype", default=env("BEASTSERVE_DTYPE", "auto"),
                        help="the target's dtype: for training and evaluation (default: %(default)s)")
    parser.add_argument("--data-dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"),
                        help="the target's dtype while it writes the training data (default: --dtype); "
                             "bfloat16 generates faster than a float32 target does")
    parser.add_argument("--temperatures", default=",".join(map(str, TEMPERATURES)),
                        type=temperature_list,
                        help="answers are sampled at these temperatures in turn (default: %(default)s)")
    parser.add_argument("--max-answer-tokens", type=int, default=256,
                        help="most tokens of an answer the target writes for training (default: %(default)s)")
    parser.add_argument("--max-prompt-tokens", type=int, default=64, help="most tokens of a prompt the target writes"
                                                                          " (default: %(default)s)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="sequences the engine generates at once"
                                                                      " (default: %(default)s)")
    parser.add_argument("--epochs", type=float, default=4.0, help="passes over the training data"
                                                                  " (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (AdamW) (default: %(default)s)")
    parser.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per training step"
                                                                        " (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=64, help="target logits kept per position (default: %(default)s)")
    parser.add_argument("--loss", choices=LOSSES, default="kl",
                        help="kl: forward KL to the target; tv: total variation, what acceptance rewards "
                             "(default: %(default)s)")
    parser.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts to evaluate on"
                                                                     " (default: %(default)s)")
    parser.add_argument("--eval-tokens", type=int, default=128, help="most tokens per evaluation answer"
                                                                     " (default: %(default)s)")
    parser.add_argument("--eval-speed-prompts", type=int, default=4,
                        help="of those, answered one at a time, at each depth 1..k and without speculation"
                             " (default: %(default)s)")
    parser.add_argument("--k", type=int, default=4, help="tokens drafted per step in the evaluation"
                                                         " (default: %(default)s)")
    parser.add_argument("--draft-vocab", type=int, default=DEFAULT_SIZE,
                        help="restrict the draft's LM head to the target's N most frequent answer tokens "
                             "(0: the whole vocabulary) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data generation and training"
                                                            " (default: %(default)s)")


def temperature_list(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(","))


def check_args(args: argparse.Namespace) -> None:
    for flag, minimum in (("layers", 1), ("tokens", 1), ("max_answer_tokens", 1), ("max_prompt_tokens", 1),
                          ("max_num_seqs", 1), ("batch_tokens", 1), ("top_k", 1), ("eval_prompts", 1),
                          ("eval_tokens", 2), ("eval_speed_prompts", 1), ("k", 1)):
        if getattr(args, flag) < minimum:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= {minimum}, got {getattr(args, flag)}")
    for flag in ("max_minutes", "epochs", "lr"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    if not 0 < args.generation_share < 1:
        raise ValueError(f"--generation-share must be in (0, 1), got {args.generation_share}")
    if not args.temperatures or any(t < 0 for t in args.temperatures):
        raise ValueError(f"--temperatures must be numbers >= 0, got {args.temperatures}")
    if args.draft_vocab < 0:
        raise ValueError(f"--draft-vocab must be >= 0, got {args.draft_vocab}")
    if args.k > 16:
        raise ValueError(f"--k must be <= 16, got {args.k}")


@dataclass
class TargetData:
    """What training needs from the target: its answers, and a transformers copy of it."""

    samples: list[Sample]
    eval_prompts: list[list[dict]]  # held out from training
    teacher: object
    fingerprint: str
    tokenizer: object
    num_layers: int
    vocab_size: int
    eos_token_ids: tuple
    seconds: float


def generate_data(args: argparse.Namespace, start: float) -> TargetData:
    """Load the target in our engine and make the training data with it. The engine (and its KV
    cache) is gone once this returns."""
    user_prompts = read_prompts(args.prompts) if args.prompts else None
    data_dtype = args.data_dtype or args.dtype
    llm = LLM(args.target, device=args.device, dtype=data_dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=max(2048, 4 * args.max_num_seqs), seed=args.seed)
    engine = llm.engine
    num_layers = engine.model_config.num_hidden_layers
    vocab_size, eos_token_ids = engine.vocab_size, engine.eos_token_ids
    if args.layers > num_layers:
        raise ValueError(f"--layers must be at most the target's {num_layers} layers, got {args.layers}")
    if llm.tokenizer is None or not llm.tokenizer.chat_template:
        raise ValueError("--target: needs a tokenizer with a chat template (prompts are chats)")
    train_prompts, eval_prompts = split_prompts(llm, user_prompts, args.eval_prompts, args.max_prompt_tokens)
    # Rounds of max_num_seqs requests: each is admitted at once, so on CUDA most steps are pure decode
    # steps that replay CUDA graphs (a step that admits a prompt runs eagerly).
    stream = prompt_stream(llm, train_prompts, eval_prompts, args.temperatures, args.max_num_seqs,
                           args.max_prompt_tokens)
    deadline = start + 60 * args.max_minutes * args.generation_share
    with tqdm(total=args.tokens, desc="generating", unit="tok", mininterval=1.0) as bar:
        samples = generate_samples(llm, stream, args.tokens, deadline, args.max_answer_tokens, args.max_num_seqs, bar)
    model, tokenizer, fingerprint = engine.model, llm.tokenizer, target_fingerprint(engine.model)
    if data_dtype != args.dtype:  # the teacher is the target in --dtype, loaded afresh once the engine is gone
        device = engine.device
        del llm, engine, model
        free_memory()
        config = EngineConfig(model=args.target, dtype=args.dtype)
        model = load_model(args.target, None, config.load_format, config.torch_dtype(device), device, None).model
    teacher = hf_model(model, model.lm_head.weight.device, model.lm_head.weight.dtype)
    return TargetData(samples, eval_prompts, teacher, fingerprint, tokenizer, num_layers, vocab_size,
                      eos_token_ids, time.monotonic() - start)


def run_distill(args: argparse.Namespace) -> int:
    check_args(args)
    if args.kind == "eagle":
        from scheduler.distill.eagle_command import run_eagle

        return run_eagle(args)
    start = time.monotonic()
    data = generate_data(args, start)
    generated = sum(len(s.token_ids) - s.num_prompt_tokens for s in data.samples)
    print(f"generated {generated} answer tokens for {len(data.samples)} prompts in {data.seconds:.0f} s", flush=True)
    free_memory()

    draft = init_draft(data.teacher, args.layers)
    config = TrainConfig(top_k=args.top_k, loss=args.loss, lr=args.lr, batch_tokens=args.batch_tokens,
                         epochs=args.epochs, max_seconds=max(1.0, start + 60 * args.max_minutes - time.monotonic()),
                         seed=args.seed)
    stats = train(data.teacher, draft, data.samples, config)
    print(f"trained {stats['steps']} steps ({stats['epochs']} epochs) in {stats['seconds']} s: agreement with the "
          f"target {stats['first_batch_agreement']:.3f} -> {stats['agreement']:.3f}", flush=True)
    data.teacher = None

    manifest = {"target": _target_name(args.target), "target_fingerprint": data.fingerprint,
                "layers_from_target": draft_layer_ids(data.num_layers, args.layers),
                "command": args.command_line, "made_with": _versions(),
                "data": {"samples": len(data.samples), "answer_tokens": generated, "seconds": round(data.seconds, 1),
                         "temperatures": list(args.temperatures), "prompts": args.prompts or "written by the target"},
                "train": stats}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.compact:
        size = save_compact(draft, out, manifest)
        print(f"compact draft: {size / 2**20:.1f} MiB of weights in {out}", flush=True)
    else:
        save_full(draft, data.tokenizer, out, manifest)
    if args.draft_vocab:
        token_ids, summary = make_vocab(data.samples, data.vocab_size, args.draft_vocab, data.tokenizer,
                                        data.eos_token_ids)
        write_vocab(out, token_ids, summary)
        print(f"draft vocabulary: {summary['size']} of {summary['of']} tokens (held-out coverage "
              f"{summary['held_out_coverage']:.4f})", flush=True)
    del draft
    free_memory()

    result = evaluate(args.target, str(out), data.eval_prompts, k=args.k, max_tokens=args.eval_tokens,
                      num_speed_prompts=args.eval_speed_prompts, device=args.device, dtype=args.dtype)
    result.update(train=stats, data=manifest["data"])
    (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    print(format_report(result))
    return 0


def _target_name(target: str) -> str:
    source = resolve_model(target)
    return source.gguf_file or Path(source.directory).name


def _versions() -> dict:
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "device": device}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None, prog: str = "python -m scheduler.distill") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_distill_args(parser)
    from scheduler.distill.eagle_command import add_eagle_args

    add_eagle_args(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.command_line = shlex.join([*prog.split(), *argv])
    try:
        return run_distill(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{prog.split()[-1]}: {exc}", file=sys.stderr)
        return 2
