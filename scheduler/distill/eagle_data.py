"""Training and held-out data for an EAGLE head: the target's answers to chat prompts (written by the
target itself), code prompts and prose prompts (built from local sources, see sources.py), and raw
code and documentation the target reads teacher-forced. Saved as JSON lines so a resumed run reuses
them rather than generating again."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from scheduler.core.params import SamplingParams
from scheduler.distill.data import EVAL_SEED, Sample, generate_samples, prompt_stream, write_prompts
from scheduler.distill.sources import LocalData
from scheduler.llm import LLM

ANSWER_KINDS = ("code", "chat", "prose")
# The training samples in a compact binary file (millions of tokens travel to and from a leased machine);
# the few held-out ones as JSON lines, easy to read. SOURCES_FILE: what `--stage data` writes.
TRAIN_FILE, HELD_OUT_FILE, SOURCES_FILE = "train.npz", "held_out.jsonl", "sources.json.gz"
SAMPLE_KINDS = ("code", "chat", "prose", "text")
ROUND_BATCHES = 4


def save_samples(path: Path, samples: list[Sample]) -> None:
    """JSON lines, or (a .npz path) token ids as uint16/uint32 with each sample's length, prompt
    length and kind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".npz":
        flat = [t for s in samples for t in s.token_ids]
        dtype = np.uint16 if max(flat, default=0) < 2**16 else np.uint32
        with open(tmp, "wb") as f:
            np.savez_compressed(f, tokens=np.asarray(flat, dtype=dtype),
                                lengths=np.asarray([len(s.token_ids) for s in samples], dtype=np.int64),
                                prompts=np.asarray([s.num_prompt_tokens for s in samples], dtype=np.int64),
                                kinds=np.asarray([SAMPLE_KINDS.index(s.kind) for s in samples], dtype=np.int8))
    else:
        tmp.write_text("".join(json.dumps({"ids": s.token_ids, "prompt": s.num_prompt_tokens, "kind": s.kind}) + "\n"
                               for s in samples))
    tmp.replace(path)


def load_samples(path: Path) -> list[Sample]:
    """What save_samples() wrote."""
    if path.suffix != ".npz":
        return [Sample(r["ids"], r["prompt"], r["kind"]) for r in map(json.loads, path.read_text().splitlines())]
    with np.load(path) as f:
        tokens, lengths, prompts, kinds = f["tokens"].tolist(), f["lengths"], f["prompts"], f["kinds"]
    ends = np.cumsum(lengths).tolist()
    return [Sample(tokens[end - length:end], int(prompt), SAMPLE_KINDS[kind])
            for end, length, prompt, kind in zip(ends, lengths.tolist(), prompts.tolist(), kinds.tolist())]


def _chats(prompts: list[str], max_chars: int) -> list[list[dict]]:
    return [[{"role": "user", "content": p[:max_chars]}] for p in prompts]


def _cycle(conversations: list[list[dict]], temperatures: tuple[float, ...]):
    for i, conversation in enumerate(conversations):
        yield conversation, temperatures[i % len(temperatures)]


def answer_samples(llm: LLM, local: LocalData, tokens: int, deadline: float, temperatures: tuple[float, ...],
                   max_answer_tokens: int, max_num_seqs: int, max_prompt_tokens: int, shares: dict,
                   held_out: list[list[dict]] = (), max_prompt_chars: int = 1500) -> list[Sample]:
    """The target's answers: each kind of prompt gets its share of the tokens and of the time left.
    Chat prompts come from seeds the held-out ones never use (and never equal one of `held_out`)."""
    streams = {"code": _cycle(_chats(local.code_prompts, max_prompt_chars), temperatures),
               "prose": _cycle(_chats(local.prose_prompts, max_prompt_chars), temperatures),
               "chat": prompt_stream(llm, None, list(held_out), temperatures, max_num_seqs, max_prompt_tokens)}
    samples = []
    total = sum(shares.values())
    with tqdm(total=tokens, desc="answering", unit="tok", mininterval=1.0) as bar:
        for n, kind in enumerate(ANSWER_KINDS):
            share, left = shares.get(kind, 0), sum(shares.get(k, 0) for k in ANSWER_KINDS[n:])
            if share <= 0:
                continue
            # This kind's share of the time still left: one that finished early leaves its time to the rest.
            until = time.monotonic() + share / left * (deadline - time.monotonic())
            # Rounds of ROUND_BATCHES engine batches: as short answers end, queued prompts take their rows, so
            # the batch stays full rather than draining to the round's longest answer.
            made = generate_samples(llm, streams[kind], int(share / total * tokens), until, max_answer_tokens,
                                    ROUND_BATCHES * max_num_seqs, bar)
            samples += [Sample(s.token_ids, s.num_prompt_tokens, kind) for s in made]
    return samples


def held_out_chats(llm: LLM, count: int, max_prompt_tokens: int) -> list[list[dict]]:
    """Chat prompts the target writes from the seeds training never uses."""
    return write_prompts(llm, count, EVAL_SEED, max_prompt_tokens) if count else []


def held_out_prompts(llm: LLM, local: LocalData, count: int, max_prompt_tokens: int,
                     max_prompt_chars: int = 1500) -> dict[str, list[list[dict]]]:
    """`count` held-out code prompts and `count` held-out chat prompts (half written by the target from
    held-out seeds, half prose prompts from held-out files): the sets a head is judged on."""
    prose = _chats(local.held_out_prose_prompts[:count // 2], max_prompt_chars)
    return {"code": _chats(local.held_out_code_prompts[:count], max_prompt_chars),
            "chat": held_out_chats(llm, count - len(prose), max_prompt_tokens) + prose}


def held_out_samples(llm: LLM, local: LocalData, count: int, max_tokens: int, max_prompt_tokens: int) -> list[Sample]:
    """The target's greedy answers to held_out_prompts()."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    samples = []
    for kind, conversations in held_out_prompts(llm, local, count, max_prompt_tokens).items():
        for out in llm.chat(conversations, params) if conversations else []:
            samples.append(Sample(out.prompt_token_ids + out.token_ids, len(out.prompt_token_ids), kind))
    return samples


def text_samples(tokenizer, texts: list[str], tokens: int, chunk: int) -> list[Sample]:
    """Raw code and documentation cut into chunks of `chunk` tokens, up to `tokens` in all."""
    samples, made = [], 0
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for at in range(0, len(ids) - chunk // 4, chunk):
            piece = ids[at:at + chunk]
            samples.append(Sample(piece, 0, "text"))
            made += len(piece)
            if made >= tokens:
                return samples
    return samples
