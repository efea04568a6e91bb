"""`distill-draft --kind eagle`: train an EAGLE head for a target. The target answers chat, code
and prose prompts and reads raw code and documentation (eagle_data.py, sources.py); its hidden
states and top-k logits over all of that are kept on disk (features.py); the head is trained with
its own drafts fed back (eagle_train.py), checkpointed so `--resume` carries on; its acceptance is
then simulated on held-out code and chat (eagle_evaluate.py) and written to eval.json."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from scheduler.config import EngineConfig
from scheduler.distill.command import _target_name, _versions, free_memory
from scheduler.distill.eagle_data import (
    HELD_OUT_FILE,
    SOURCES_FILE,
    TRAIN_FILE,
    answer_samples,
    held_out_samples,
    load_samples,
    save_samples,
    text_samples,
)
from scheduler.distill.eagle_evaluate import format_simulated, simulated_report
from scheduler.distill.eagle_train import CHECKPOINT, HeadTrainConfig, train_head
from scheduler.distill.features import (
    MAX_LEN,
    FeatureBatches,
    LiveBatches,
    as_sample,
    cached_features,
    column_map,
    read_cached,
)
from scheduler.distill.phases import PhaseClock, phase_shares
from scheduler.distill.sources import LocalData, load_local_data, local_data, save_local_data
from scheduler.distill.train import hf_model
from scheduler.distill.vocab import make_vocab
from scheduler.llm import LLM
from scheduler.speculative.draft.compact import VOCAB_FILE, load_vocab, save_vocab, target_fingerprint
from scheduler.speculative.eagle.files import save_head
from scheduler.speculative.eagle.head import EagleHead
from scheduler.worker.models import load_model


def add_eagle_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--kind eagle")
    group.add_argument("--unroll", type=int, default=4, help="draft steps unrolled in training (training-time test)"
                                                             " (default: %(default)s)")
    group.add_argument("--layer-ids", type=lambda t: [int(i) for i in t.split(",")], default=None,
                       help="the target's layers the head reads, e.g. 1,14,26 (default: a low, a middle and a high "
                            "one)")
    group.add_argument("--text-tokens", type=int, default=200_000,
                       help="tokens of raw code and documentation read teacher-forced (default: %(default)s)")
    group.add_argument("--text-chunk", type=int, default=256, help="tokens per raw text sample"
                                                                  " (default: %(default)s)")
    group.add_argument("--answer-shares", default="code=4,chat=4,prose=2", type=_shares,
                       help="how the answer tokens split between kinds of prompt (default: %(default)s)")
    group.add_argument("--max-files", type=int, default=4000, help="source and documentation files read, of each "
                                                                  "kind (default: %(default)s)")
    group.add_argument("--sources", action="append", default=None,
                       help="a folder of code and docs to read (repeatable; default: the standard library and "
                            "the installed packages)")
    group.add_argument("--resume", action="store_true",
                       help="carry on from --out: its data, the target's features and the last checkpoint")
    group.add_argument("--stage", choices=("all", "data"), default="all",
                       help="data: only read the local files into --out/" + SOURCES_FILE + " (prompts, raw texts "
                            "and the held-out split; no model run), for --prompts-from on another machine; "
                            "all: the whole run (default: %(default)s)")
    group.add_argument("--prompts-from", default=None,
                       help="a prompts file --stage data wrote: used instead of reading local files")
    group.add_argument("--scan-seconds", type=float, default=120.0,
                       help="most seconds spent reading local files (besides --max-files) (default: %(default)s)")
    group.add_argument("--phases", type=phase_shares, default="answers=0.35,read=0.2,train=0.4,eval=0.05",
                       help="how --max-minutes splits between the phases: each gets its share of the time left "
                            "when it starts (default: %(default)s)")
    group.add_argument("--features", choices=("auto", "cache", "live"), default="auto",
                       help="cache: the target's hidden states and top-k logits read once and kept on disk; "
                            "live: the target run inside the training loop on every batch (no disk); "
                            "auto: live on CUDA, cache on CPU (default: %(default)s)")
    group.add_argument("--learn-prompts", action=argparse.BooleanOptionalAction, default=True,
                       help="train on the target's predictions over the prompts of its answers too, not only "
                            "over the answers (the target reads them anyway) (default: %(default)s)")
    group.add_argument("--extra-data", action="append", default=[],
                       help="another run's --out (same sources, so the same held-out split) whose cached features "
                            "join the training set: reads already paid for (--features cache; repeatable)")
    group.add_argument("--train-minutes-total", type=float, default=None,
                       help="training minutes planned over all calls of a resumed run: the learning rate decays "
                            "over those rather than over this call's share (default: this call's)")


def _shares(text: str) -> dict:
    shares = {}
    for part in text.split(","):
        kind, _, value = part.partition("=")
        if kind not in ("code", "chat", "prose"):
            raise argparse.ArgumentTypeError(f"unknown kind {kind!r} (code, chat, prose)")
        shares[kind] = float(value)
    return shares


def check_eagle_args(args: argparse.Namespace) -> None:
    # flags of the small draft only
    unused = {"prompts": None, "layers": 2, "loss": "kl", "compact": True, "generation_share": 0.5}
    for flag, default in unused.items():
        if getattr(args, flag) != default:
            raise ValueError(f"--{flag}: not used by --kind eagle (its data: README, 'Making an EAGLE head')")
    for flag, minimum in (("unroll", 1), ("text_tokens", 0), ("text_chunk", 16), ("max_files", 1)):
        if getattr(args, flag) < minimum:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= {minimum}, got {getattr(args, flag)}")
    if sum(args.answer_shares.values()) <= 0 or min(args.answer_shares.values()) < 0:
        raise ValueError(f"--answer-shares must be >= 0 and not all 0, got {args.answer_shares}")
    for folder in args.sources or []:
        if not Path(folder).is_dir():
            raise ValueError(f"--sources: no such folder: {folder}")
    if args.prompts_from and not Path(args.prompts_from).is_file():
        raise ValueError(f"--prompts-from: no such file: {args.prompts_from}")
    if args.prompts_from and args.sources:
        raise ValueError("--prompts-from and --sources: give one of them")
    if not args.scan_seconds > 0:
        raise ValueError(f"--scan-seconds must be > 0, got {args.scan_seconds}")
    for extra in args.extra_data:
        if not (Path(extra) / "data" / "features").is_dir():
            raise ValueError(f"--extra-data: no cached features in {extra}/data/features")
    if args.extra_data and args.features == "live":
        raise ValueError("--extra-data: joins cached features; not with --features live")
    if args.train_minutes_total is not None and not args.train_minutes_total > 0:
        raise ValueError(f"--train-minutes-total must be > 0, got {args.train_minutes_total}")


def read_sources(args: argparse.Namespace) -> LocalData:
    """Prompts and raw texts: from --prompts-from, else read from local files (bounded by --max-files
    and --scan-seconds)."""
    if args.prompts_from:
        return load_local_data(Path(args.prompts_from))
    roots = [Path(s) for s in args.sources] if args.sources else None
    return local_data(roots, args.seed, args.max_files, args.scan_seconds)


def write_sources(args: argparse.Namespace) -> int:
    """--stage data: the prompts file for --prompts-from, holding what --tokens and --text-tokens need
    (a code answer is ~100 tokens or more; a token of raw code or docs ~3-4 characters)."""
    start = time.monotonic()
    local = read_sources(args)
    path = Path(args.out) / SOURCES_FILE
    size = save_local_data(path, local, max_prompts=max(1000, args.tokens // 50), max_text_chars=6 * args.text_tokens)
    print(f"{path}: {size / 2**20:.1f} MiB; {local.files} files read ({local.held_out_files} held out), "
          f"{len(local.code_prompts)} code and {len(local.prose_prompts)} prose prompts, "
          f"{len(local.held_out_code_prompts)} and {len(local.held_out_prose_prompts)} held out, "
          f"{time.monotonic() - start:.0f} s", flush=True)
    return 0


def make_data(args: argparse.Namespace, data_dir: Path, clock: PhaseClock) -> dict:
    """Generate the training and held-out samples into data_dir (TRAIN_FILE, HELD_OUT_FILE) within
    the answer phase's share of the time."""
    start = time.monotonic()
    deadline = clock.start("answers")
    local = read_sources(args)
    scanned = time.monotonic() - start
    llm = LLM(args.target, device=args.device, dtype=args.data_dtype or args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=max(2048, 16 * args.max_num_seqs), seed=args.seed)
    if llm.tokenizer is None or not llm.tokenizer.chat_template:
        raise ValueError("--target: needs a tokenizer with a chat template (prompts are chats)")
    held_out = held_out_samples(llm, local, args.eval_prompts, args.eval_tokens, args.max_prompt_tokens)
    answering = time.monotonic()
    answers = answer_samples(llm, local, args.tokens, deadline, args.temperatures, args.max_answer_tokens,
                             args.max_num_seqs, args.max_prompt_tokens, args.answer_shares)
    answering = time.monotonic() - answering
    texts = text_samples(llm.tokenizer, local.texts, args.text_tokens, args.text_chunk)
    save_samples(data_dir / HELD_OUT_FILE, held_out)
    save_samples(data_dir / TRAIN_FILE, answers + texts)
    made = sum(len(s.token_ids) - s.num_prompt_tokens for s in answers)
    summary = {"files": local.files, "held_out_files": local.held_out_files,
               "prompts": {"code": len(local.code_prompts), "prose": len(local.prose_prompts)},
               "from": args.prompts_from or "local files", "scan_seconds": round(scanned, 1),
               "answer_tokens": made, "answer_seconds": round(answering, 1),
               "answer_tokens_per_second": round(made / max(answering, 1e-9), 1),
               "seconds": round(time.monotonic() - start, 1)}
    (data_dir / "sources.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"answers: {made} tokens in {answering:.0f} s ({summary['answer_tokens_per_second']} tokens/s, "
          f"{args.max_num_seqs} sequences at most at once)", flush=True)
    del llm
    free_memory()
    clock.stop("answers")
    return summary


def data_summary(samples, learn_prompts: bool) -> dict:
    """Samples and tokens by kind: answer_tokens those the target wrote, trained_tokens those learnt."""
    kinds = {}
    for s in samples:
        entry = kinds.setdefault(s.kind, {"samples": 0, "tokens": 0, "answer_tokens": 0, "trained_tokens": 0})
        entry["samples"] += 1
        entry["tokens"] += len(s.token_ids)
        entry["answer_tokens"] += len(s.token_ids) - s.num_prompt_tokens
        entry["trained_tokens"] += len(s.token_ids) - (0 if learn_prompts else max(0, s.num_prompt_tokens - 1))
    return {"by_kind": kinds}


def run_eagle(args: argparse.Namespace) -> int:
    check_eagle_args(args)
    if args.stage == "data":
        return write_sources(args)
    start = time.monotonic()
    clock = PhaseClock(start + 60 * args.max_minutes, args.phases)
    out, data_dir = Path(args.out), Path(args.out) / "data"
    if not args.resume and data_dir.exists():
        shutil.rmtree(data_dir)  # features of other samples must never be read back
        (out / CHECKPOINT).unlink(missing_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    if not (data_dir / TRAIN_FILE).is_file():
        make_data(args, data_dir, clock)
    samples, held_out = load_samples(data_dir / TRAIN_FILE), load_samples(data_dir / HELD_OUT_FILE)
    data = dict(data_summary(samples, args.learn_prompts), sources=json.loads((data_dir / "sources.json").read_text()))
    print(f"data: {json.dumps(data['by_kind'])}; {len(held_out)} held-out answers", flush=True)

    engine_config = EngineConfig(model=args.target, device=args.device, dtype=args.dtype)
    device = engine_config.torch_device()
    target = load_model(args.target, None, engine_config.load_format, engine_config.torch_dtype(device), device, None)
    teacher = hf_model(target.model, device, target.model.lm_head.weight.dtype)
    fingerprint = target_fingerprint(target.model)
    head = EagleHead.for_target(teacher.config, args.layer_ids, target.max_positions).to(device)
    extra = [f for d in args.extra_data for f in read_cached(Path(d) / "data" / "features")]
    vocab_ids = _head_vocab(args, out, samples + [as_sample(f) for f in extra], target, teacher.config.vocab_size)
    embed, lm_head = teacher.model.embed_tokens.weight, teacher.lm_head.weight
    head.bind(embed.float(), lm_head.float(), vocab_ids)
    del target
    live = args.features == "live" or (args.features == "auto" and device.type == "cuda")
    columns = column_map(vocab_ids, teacher.config.vocab_size)
    held = cached_features(data_dir / "held_out_features", teacher, held_out, head.layer_ids, args.top_k,
                           args.batch_tokens, MAX_LEN)
    if live:
        source = LiveBatches(teacher, samples, head.layer_ids, args.top_k, columns, MAX_LEN, args.learn_prompts)
        data["read_tokens"] = 0
    else:
        deadline = clock.start("read")
        with tqdm(total=sum(len(s.token_ids) for s in samples), desc="reading", unit="tok", mininterval=1.0) as bar:
            features = cached_features(data_dir / "features", teacher, samples, head.layer_ids, args.top_k,
                                       args.batch_tokens, MAX_LEN, bar.update, deadline, args.learn_prompts)
        clock.stop("read")
        del teacher
        free_memory()
        data["read_tokens"] = sum(len(f.token_ids) for f in features)
        if extra:
            data["extra"] = {"from": args.extra_data, "samples": len(extra),
                             "tokens": sum(len(f.token_ids) for f in extra)}
        source = FeatureBatches(features + extra, columns)
    deadline = clock.start("train")
    total = None if args.train_minutes_total is None else 60 * args.train_minutes_total
    config = HeadTrainConfig(unroll=args.unroll, lr=args.lr, batch_tokens=args.batch_tokens, epochs=args.epochs,
                             max_seconds=max(1.0, deadline - time.monotonic()), total_seconds=total, seed=args.seed)
    stats = train_head(head, source, config, out, resume=args.resume)
    clock.stop("train")
    print(f"trained {stats['steps']} steps ({stats['epochs']} epochs) in {stats['seconds']} s, agreement by "
          f"step {stats['agreement_by_step']}", flush=True)
    clock.start("eval")
    report = simulated_report(head, held, args.k)
    clock.stop("eval")
    manifest = {"target": _target_name(args.target), "target_fingerprint": fingerprint, "command": args.command_line,
                "made_with": _versions(), "data": data, "train": stats}
    size = save_head(head, out, manifest)
    vocab = head.config["vocab_size"] if head.vocab_ids is None else len(head.vocab_ids)
    result = {"k": args.k, "simulated": report, "train": stats, "data": data, "head_bytes": size, "head_vocab": vocab,
              "features": "live" if live else "cache", "phase_seconds": clock.spent,
              "seconds": round(time.monotonic() - start, 1)}
    (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"head: {size / 2**20:.1f} MiB of weights in {out}; seconds by phase {clock.spent}")
    print(format_simulated(report))
    return 0


def _head_vocab(args, out: Path, samples, target, vocab_size: int) -> torch.Tensor | None:
    """The tokens the head proposes: the data's most frequent (--draft-vocab), chosen once per --out."""
    if args.resume and (out / VOCAB_FILE).is_file():
        return load_vocab(out, vocab_size)
    (out / VOCAB_FILE).unlink(missing_ok=True)
    if not args.draft_vocab:
        return None
    token_ids, _ = make_vocab(samples, vocab_size, args.draft_vocab, target.tokenizer, ())
    if token_ids is None:
        return None
    save_vocab(out, token_ids)
    return torch.tensor(token_ids)
