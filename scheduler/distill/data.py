"""Training data for a draft: the target's own answers, generated with our engine at the
temperatures users sample at, to prompts from a file or prompts the target writes itself."""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from scheduler.core.params import SamplingParams
from scheduler.llm import LLM

TEMPERATURES = (0.0, 0.7, 1.0)
EVAL_SEED = 1_000_000  # self-written evaluation prompts come from seeds training never uses
TOPICS = [
    "cooking", "gardening", "space exploration", "ancient history", "personal finance", "machine learning",
    "music theory", "climate change", "the human body", "travel in Europe", "chess", "photography", "oceans",
    "programming in Python", "job interviews", "healthy sleep", "electric cars", "world religions", "poetry",
    "mathematics", "birds", "the stock market", "video games", "learning languages", "volcanoes", "friendship",
    "small businesses", "renewable energy", "the internet", "dinosaurs", "football", "philosophy", "coffee",
    "city planning", "mental health", "robots", "painting", "the French Revolution", "chemistry", "pets",
    "time management", "movies", "farming", "weather", "board games", "architecture", "running", "physics",
]
TASKS = [
    "Write one question a curious person might ask about {topic}.",
    "Write one question a student might ask a teacher about {topic}.",
    "Write a request asking an assistant to explain an idea from {topic} in simple words.",
    "Write a request for a short story that involves {topic}.",
    "Write a request for a list of practical tips about {topic}.",
    "Write a request asking an assistant to compare two things related to {topic}.",
    "Write a request for a short poem about {topic}.",
    "Write a question asking how something in {topic} works.",
    "Write a request for a step-by-step guide to a task related to {topic}.",
    "Write a request for a short email to a friend about {topic}.",
    "Write a short programming task in Python that has to do with {topic}.",
    "Write a question asking for the pros and cons of something in {topic}.",
]


@dataclass
class Sample:
    token_ids: list[int]  # prompt and answer
    num_prompt_tokens: int
    kind: str = "chat"  # chat, code, prose (answers) or text (read teacher-forced)


def read_prompts(path: str) -> list[list[dict]]:
    """A JSONL file, one {"prompt": "..."} or {"messages": [{"role", "content"}, ...]} per line."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--prompts: no such file: {path}")
    conversations = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--prompts: line {number} is not JSON ({exc.msg})") from None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str) and record["prompt"]:
            conversations.append([{"role": "user", "content": record["prompt"]}])
        elif isinstance(record, dict) and isinstance(record.get("messages"), list) and record["messages"]:
            conversations.append(record["messages"])
        else:
            raise ValueError(f"--prompts: line {number} needs a non-empty 'prompt' string or 'messages' list")
    if len(conversations) < 2:
        raise ValueError(f"--prompts: {path} holds {len(conversations)} prompts; at least 2 are needed "
                         "(some are held out for evaluation)")
    return conversations


def write_prompts(llm: LLM, count: int, seed: int, max_tokens: int = 64) -> list[list[dict]]:
    """Ask the target to write `count` questions and tasks on varied topics, sampled with seeds seed.."""
    rng = random.Random(seed)
    asks = [rng.choice(TASKS).format(topic=rng.choice(TOPICS)) + " Reply with the question or request only."
            for _ in range(count)]
    params = [SamplingParams(temperature=1.0, top_p=0.95, max_tokens=max_tokens, seed=seed + i) for i in range(count)]
    outputs = llm.chat([[{"role": "user", "content": ask}] for ask in asks], params)
    return [[{"role": "user", "content": out.text.strip() or ask}] for out, ask in zip(outputs, asks)]


def split_prompts(llm: LLM, user_prompts: list[list[dict]] | None, num_eval: int, max_prompt_tokens: int):
    """(training prompt source, held-out evaluation prompts). A user file gives up its last tenth
    (at most num_eval) to evaluation; otherwise the target writes the evaluation prompts from seeds
    that training never uses."""
    if user_prompts:
        held = max(1, min(num_eval, len(user_prompts) // 10))
        return user_prompts[:-held], user_prompts[-held:]
    return None, write_prompts(llm, num_eval, EVAL_SEED, max_prompt_tokens)


def prompt_stream(llm: LLM, user_prompts: list[list[dict]] | None, exclude: list[list[dict]],
                  temperatures: tuple[float, ...], write_batch: int,
                  max_prompt_tokens: int) -> Iterator[tuple[list[dict], float]]:
    """(conversation, temperature) pairs. User prompts are cycled with rotating temperatures (greedy
    only once per prompt); without them the target writes new prompts, write_batch at a time."""
    if user_prompts:
        for cycle in itertools.count():
            if cycle >= len(temperatures) and max(temperatures) == 0:
                return  # greedy answers would only repeat
            for j, conversation in enumerate(user_prompts):
                temperature = temperatures[(j + cycle) % len(temperatures)]
                if temperature > 0 or cycle < len(temperatures):
                    yield conversation, temperature
    held_out = {json.dumps(c) for c in exclude}
    index = 0
    for seed in range(0, EVAL_SEED - write_batch, write_batch):
        for conversation in write_prompts(llm, write_batch, seed, max_prompt_tokens):
            if json.dumps(conversation) not in held_out:
                yield conversation, temperatures[index % len(temperatures)]
                index += 1


def generate_samples(llm: LLM, prompts: Iterator[tuple[list[dict], float]], num_tokens: int, deadline: float,
                     max_answer_tokens: int, round_size: int, progress) -> list[Sample]:
    """Answer prompts in rounds of up to round_size (the engine batches each round) until num_tokens
    answer tokens are made or the monotonic deadline passes. Rounds are sized, from the answers'
    mean length and the rate so far, to end near both limits rather than run past them."""
    samples, made, seed = [], 0, 0
    mean_answer, rate = max_answer_tokens / 2, None  # answer tokens per second
    start = time.monotonic()
    while made < num_tokens and time.monotonic() < deadline:
        wanted = num_tokens - made
        if rate is not None:
            wanted = min(wanted, rate * (deadline - time.monotonic()))
        size = max(1, min(round_size, int(wanted / mean_answer) + 1))
        batch = list(itertools.islice(prompts, size))
        if not batch:
            break
        params = [SamplingParams(temperature=t, max_tokens=max_answer_tokens, seed=seed + i)
                  for i, (_, t) in enumerate(batch)]
        seed += size
        for out in llm.chat([c for c, _ in batch], params):
            samples.append(Sample(out.prompt_token_ids + out.token_ids, len(out.prompt_token_ids)))
            made += len(out.token_ids)
            progress.update(len(out.token_ids))
        mean_answer = made / len(samples)
        rate = made / (time.monotonic() - start)
    return samples
