"""Host cost of incremental detokenization: microseconds per output token of IncrementalDetokenizer.

    python -m bench.detokenizer --streams 64 --tokens 256 --repeats 5

The text is this repository's markdown, cut into --streams pieces of --tokens tokens, each piece with
the 32 tokens before it as its prompt. The pieces are fed like the engine feeds a decode step of that
many requests: one token per request per step, add_tokens then take_delta. Two decode paths are timed
on the same tokenizer: the one the detokenizer picks for it, and tokenizer.decode through a wrapper
that hides the Rust backend (the fallback path, for tokenizers without one).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import tokenizers
import transformers

from scheduler.core.params import SamplingParams
from scheduler.io.detokenizer import IncrementalDetokenizer
from scheduler.worker.models import load_tokenizer

PROMPT_TOKENS = 32


class PythonDecode:
    """Only tokenizer.decode, so the detokenizer cannot reach the Rust backend."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode


def make_streams(tokenizer, num_streams: int, num_tokens: int) -> list[tuple[list[int], list[int]]]:
    root = Path(__file__).resolve().parent.parent
    text = "\n\n".join(p.read_text() for p in sorted(root.glob("*.md")) + sorted(root.glob("*/*.md")))
    ids = tokenizer.encode(text, add_special_tokens=False)
    span = PROMPT_TOKENS + num_tokens
    assert len(ids) >= span, f"only {len(ids)} tokens of text"
    step = max(1, (len(ids) - span) // max(1, num_streams - 1))
    starts = [min(i * step, len(ids) - span) for i in range(num_streams)]
    return [(ids[s:s + PROMPT_TOKENS], ids[s + PROMPT_TOKENS:s + span]) for s in starts]


def run(tokenizer, streams, params: SamplingParams) -> tuple[float, list[str]]:
    """Seconds for all streams fed step by step, and each stream's streamed text."""
    start = time.perf_counter()
    detoks = [IncrementalDetokenizer(tokenizer, prompt, params) for prompt, _ in streams]
    texts = [[] for _ in streams]
    num_tokens = len(streams[0][1])
    for count in range(1, num_tokens + 1):
        finished = count == num_tokens
        for detok, (_, output), text in zip(detoks, streams, texts):
            detok.add_tokens([output[count - 1]], count)
            text.append(detok.take_delta(finished))
    return time.perf_counter() - start, ["".join(t) for t in texts]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256, help="output tokens per stream")
    parser.add_argument("--repeats", type=int, default=5, help="runs per path; the best and the median are reported")
    parser.add_argument("--stop", action="append", default=[], help="a stop string that never matches (repeatable)")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.model)
    streams = make_streams(tokenizer, args.streams, args.tokens)
    params = SamplingParams(stop=args.stop)
    num_tokens = args.streams * args.tokens
    print(f"# {platform.processor() or platform.machine()}, tokenizers {tokenizers.__version__}, transformers "
          f"{transformers.__version__}, {args.streams} streams x {args.tokens} tokens, stop {args.stop}")
    print("| decode path | best us/token | median us/token |")
    print("|---|---|---|")
    reference = None
    for name, tok in [("tokenizer.decode", PythonDecode(tokenizer)), ("detokenizer's choice", tokenizer)]:
        times = []
        for _ in range(args.repeats):
            seconds, texts = run(tok, streams, params)
            times.append(seconds)
            reference = reference or texts
            assert texts == reference, f"{name}: the text differs from the first path's"
        print(f"| {name} | {min(times) / num_tokens * 1e6:.2f} | "
              f"{statistics.median(times) / num_tokens * 1e6:.2f} |", flush=True)


if __name__ == "__main__":
    main()
