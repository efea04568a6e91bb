"""A draft's vocabulary: the target's most frequent output tokens, to which the draft's LM head is
restricted. Over a 49k-token vocabulary the head is half of a small draft's pass; the tokens a
target actually writes are far fewer, and a draft only has to propose those.

`python -m scheduler.distill.vocab --target T --draft DIR` adds one to an existing draft, counting
the target's answers to the same prompts distill-draft trains on; `distill-draft --draft-vocab N`
makes one from its own training data.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from scheduler.distill.data import Sample
from scheduler.speculative.draft.compact import DRAFT_JSON, save_vocab

DEFAULT_SIZE = 16384
REPORT_SIZES = (1024, 4096, 8192, 16384, 24576, 32768)


def answer_token_counts(samples: list[Sample], vocab_size: int) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for s in samples:
        counts += np.bincount(np.asarray(s.token_ids[s.num_prompt_tokens:], dtype=np.int64), minlength=vocab_size)
    return counts


def frequent_tokens(counts: np.ndarray, size: int, always: list[int] = ()) -> list[int] | None:
    """The `size` most counted token ids (ties to the lower id) and every id in `always` (end-of-text
    and other special tokens), sorted; None when that is the whole vocabulary."""
    if size >= len(counts):
        return None
    order = np.lexsort((np.arange(len(counts)), -counts))  # by count, descending, then by id
    chosen = set(order[:size].tolist()) | {t for t in always if 0 <= t < len(counts)}
    return sorted(chosen) if len(chosen) < len(counts) else None


def coverage(counts: np.ndarray, token_ids: list[int] | None) -> float:
    """Share of the counted tokens inside token_ids."""
    total = int(counts.sum())
    if token_ids is None or total == 0:
        return 1.0
    return float(counts[token_ids].sum()) / total


def special_token_ids(tokenizer, eos_token_ids=()) -> list[int]:
    ids = set(eos_token_ids)
    if tokenizer is not None:
        ids.update(getattr(tokenizer, "all_special_ids", []) or [])
    return sorted(ids)


def make_vocab(samples: list[Sample], vocab_size: int, size: int, tokenizer, eos_token_ids=(),
               report_sizes: tuple[int, ...] = ()) -> tuple:
    """(token ids or None, a summary for draft.json). The summary's held-out coverage is that of the
    tokens chosen from half the answers, counted on the other half; also for each of report_sizes."""
    always = special_token_ids(tokenizer, eos_token_ids)
    chosen_from, counted_on = (answer_token_counts(samples[i::2], vocab_size) for i in (0, 1))
    counts = chosen_from + counted_on
    token_ids = frequent_tokens(counts, size, always)

    def held_out(n: int) -> float:
        return round(coverage(counted_on, frequent_tokens(chosen_from, n, always)), 5)

    summary = {"size": vocab_size if token_ids is None else len(token_ids), "of": vocab_size,
               "counted_tokens": int(counts.sum()), "held_out_coverage": held_out(size)}
    if report_sizes:
        summary["held_out_coverage_by_size"] = {n: held_out(n) for n in sorted(set(report_sizes))}
    return token_ids, summary


def main(argv: list[str] | None = None, prog: str = "python -m scheduler.distill.vocab") -> int:
    from tqdm.auto import tqdm

    from scheduler.distill.data import TEMPERATURES, generate_samples, prompt_stream
    from scheduler.llm import LLM

    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--target", required=True, help="the model the draft was made for")
    parser.add_argument("--draft", required=True, help="the draft's directory: draft_vocab.safetensors goes there")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="tokens to keep")
    parser.add_argument("--tokens", type=int, default=500_000, help="answer tokens to count")
    parser.add_argument("--max-minutes", type=float, default=10.0)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-answer-tokens", type=int, default=256)
    parser.add_argument("--max-prompt-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        for flag in ("size", "tokens", "max_num_seqs", "max_answer_tokens", "max_prompt_tokens"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        if not (Path(args.draft) / DRAFT_JSON).is_file() and not (Path(args.draft) / "config.json").is_file():
            raise ValueError(f"--draft: {args.draft} holds no draft (no {DRAFT_JSON} or config.json)")
        start = time.monotonic()
        llm = LLM(args.target, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=max(2048, 4 * args.max_num_seqs), seed=args.seed)
        stream = prompt_stream(llm, None, [], TEMPERATURES, args.max_num_seqs, args.max_prompt_tokens)
        with tqdm(total=args.tokens, desc="counting", unit="tok", mininterval=1.0) as bar:
            samples = generate_samples(llm, stream, args.tokens, start + 60 * args.max_minutes,
                                       args.max_answer_tokens, args.max_num_seqs, bar)
        engine = llm.engine
        token_ids, summary = make_vocab(samples, engine.vocab_size, args.size, llm.tokenizer, engine.eos_token_ids,
                                        REPORT_SIZES)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{prog.split()[-1]}: {exc}", file=sys.stderr)
        return 2
    write_vocab(Path(args.draft), token_ids, dict(summary, command=shlex.join([*prog.split(), *argv]),
                                                  seconds=round(time.monotonic() - start, 1)))
    for n, share in summary["held_out_coverage_by_size"].items():
        print(f"held-out coverage of the {n} most frequent: {share:.4f}")
    print(f"{summary['size']} of {summary['of']} tokens, from {summary['counted_tokens']} answer tokens; chosen "
          f"from half the answers, they cover {summary['held_out_coverage']:.4f} of the other half's tokens")
    return 0


def write_vocab(out: Path, token_ids: list[int] | None, summary: dict) -> None:
    """Save the vocabulary (none: remove an old one) and record it in draft.json, if there is one."""
    from scheduler.speculative.draft.compact import VOCAB_FILE

    if token_ids is None:
        (out / VOCAB_FILE).unlink(missing_ok=True)
    else:
        save_vocab(out, token_ids)
    manifest_file = out / DRAFT_JSON
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        manifest["vocab"] = summary
        manifest_file.write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
