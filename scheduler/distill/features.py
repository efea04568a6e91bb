"""What an EAGLE head learns from: the target read teacher-forced over a sample, keeping the hidden
states the head reads (after its low, middle and high layers) and the target's top-k logits where
the head is trained to match them. Kept on disk in shards, so a resumed run reads them back rather
than running the target again."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from scheduler.distill.data import Sample
from scheduler.distill.train import length_groups
from scheduler.speculative.eagle.head import aux_hidden_states

SHARD_SAMPLES = 64


@dataclass
class Features:
    token_ids: torch.Tensor  # [T] int64
    aux: torch.Tensor  # [T, len(layer_ids) * H] bfloat16: the target's hidden states the head reads
    top_values: torch.Tensor  # [T - top_from, k] float16: the target's top-k logits at top_from..T-1
    top_ids: torch.Tensor  # [T - top_from, k] int32
    top_from: int  # the first position whose next-token distribution is learnt (the last prompt token)
    kind: str

    def to_dict(self) -> dict:
        return dict(vars(self))


@torch.no_grad()
def teacher_features(teacher, samples: list[Sample], layer_ids: list[int], top_k: int, batch_tokens: int = 4096,
                     max_len: int = 1024) -> list[Features]:
    """The target (a transformers model) over each sample, cut to max_len tokens."""
    device = teacher.lm_head.weight.device
    found: dict[int, Features] = {}
    for group in length_groups([min(len(s.token_ids), max_len) for s in samples], batch_tokens):
        rows = [samples[i].token_ids[:max_len] for i in group]
        width = max(map(len, rows))
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        attention = torch.zeros(len(rows), width, dtype=torch.long)
        for r, ids in enumerate(rows):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            attention[r, :len(ids)] = 1
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = teacher.model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                output_hidden_states=True, use_cache=False)
            aux = aux_hidden_states(out.hidden_states, layer_ids)
            last = out.last_hidden_state
            for r, i in enumerate(group):
                length, top_from = len(rows[r]), max(0, samples[i].num_prompt_tokens - 1)
                values, ids = teacher.lm_head(last[r, top_from:length]).float().topk(top_k, dim=-1)
                found[i] = Features(input_ids[r, :length].clone(), aux[r, :length].to(torch.bfloat16).cpu(),
                                    values.to(torch.float16).cpu(), ids.to(torch.int32).cpu(), top_from,
                                    samples[i].kind)
    return [found[i] for i in range(len(samples))]


def cached_features(cache: Path, teacher, samples: list[Sample], layer_ids: list[int], top_k: int,
                    batch_tokens: int, max_len: int, progress: Callable[[int], None] | None = None,
                    deadline: float | None = None) -> list[Features]:
    """teacher_features over samples, SHARD_SAMPLES at a time, each shard saved in `cache` and read
    back from there when it exists. Stops early (fewer features) once the monotonic deadline passes."""
    import time

    cache.mkdir(parents=True, exist_ok=True)
    features: list[Features] = []
    for start in range(0, len(samples), SHARD_SAMPLES):
        shard = cache / f"shard-{start // SHARD_SAMPLES:05d}.pt"
        part = samples[start:start + SHARD_SAMPLES]
        if shard.is_file():
            made = [Features(**d) for d in torch.load(shard, weights_only=True)]
        elif deadline is not None and time.monotonic() > deadline:
            break
        else:
            made = teacher_features(teacher, part, layer_ids, top_k, batch_tokens, max_len)
            torch.save([f.to_dict() for f in made], shard.with_suffix(".tmp"))
            shard.with_suffix(".tmp").replace(shard)
        features += made
        if progress:
            progress(sum(len(f.token_ids) for f in made))
    return features
