"""What an EAGLE head learns from: the target read teacher-forced over a sample, keeping the hidden
states the head reads (after its low, middle and high layers) and the target's top-k logits where
the head is trained to match them.

Two ways to feed training: `cached_features` keeps them on disk in shards, read once and read back
by a resumed run (the CPU's way: reading is the slow part there, and epochs re-use it);
`LiveBatches` runs the target inside the training loop on every batch (CUDA's way: a 135M target's
forward is cheap next to the disk and memory that 3 x hidden bfloat16 values per token take for
millions of tokens). Both give train_head() the same batches (`batch_tensors`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from scheduler.distill.data import Sample
from scheduler.distill.train import length_groups
from scheduler.speculative.eagle.head import aux_hidden_states

SHARD_SAMPLES = 64
MAX_LEN = 1024  # tokens of a sample the target reads


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


def column_map(vocab_ids: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """token id -> the head's logits column (-1: a token the head never proposes)."""
    if vocab_ids is None:
        return torch.arange(vocab_size)
    columns = torch.full((vocab_size,), -1, dtype=torch.long)
    columns[vocab_ids.cpu().long()] = torch.arange(len(vocab_ids))
    return columns


def _first_learnt(sample: Sample, learn_prompts: bool) -> int:
    """The first position whose next token is learnt: the last prompt token (or 0, learning the prompt)."""
    return 0 if learn_prompts else max(0, sample.num_prompt_tokens - 1)


def _padded(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        attention[r, :len(ids)] = 1
    return input_ids.to(device), attention.to(device)


def _read(teacher, input_ids, attention, layer_ids):
    """The target over a padded batch: (aux hidden states, last hidden states)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=input_ids.device.type == "cuda"):
        out = teacher.model(input_ids=input_ids, attention_mask=attention, output_hidden_states=True, use_cache=False)
    return aux_hidden_states(out.hidden_states, layer_ids), out.last_hidden_state


def batch_tensors(input_ids, aux, top_values, top_ids, known, columns) -> dict:
    """What a training step reads, from the target's top-k (values, ids [B, T, k]; `known` [B, T]: where
    they hold): the top-k as head columns (clamped; -1 outside its vocabulary are masked) with their
    probabilities renormalised over the head's vocabulary, the target's greedy token (-1 where not
    known), and whether a position is trained on."""
    cols = columns.to(top_ids.device)[top_ids.long()]
    logits = top_values.float().masked_fill((cols < 0) | ~known[..., None], -math.inf)
    valid = logits.isfinite().any(-1)
    probs = torch.where(valid[..., None], logits.softmax(-1), 0.0).nan_to_num(0.0)
    greedy = torch.where(known, top_ids[..., 0].long(), -1)
    return dict(input_ids=input_ids, aux=aux, cols=cols.clamp(min=0), probs=probs, greedy=greedy, valid=valid,
                known=known)


@torch.no_grad()
def teacher_features(teacher, samples: list[Sample], layer_ids: list[int], top_k: int, batch_tokens: int = 4096,
                     max_len: int = MAX_LEN, learn_prompts: bool = False) -> list[Features]:
    """The target (a transformers model) over each sample, cut to max_len tokens."""
    device = teacher.lm_head.weight.device
    found: dict[int, Features] = {}
    for group in length_groups([min(len(s.token_ids), max_len) for s in samples], batch_tokens):
        rows = [samples[i].token_ids[:max_len] for i in group]
        input_ids, attention = _padded(rows, device)
        aux, last = _read(teacher, input_ids, attention, layer_ids)
        for r, i in enumerate(group):
            length, top_from = len(rows[r]), _first_learnt(samples[i], learn_prompts)
            values, ids = teacher.lm_head(last[r, top_from:length]).float().topk(top_k, dim=-1)
            found[i] = Features(input_ids[r, :length].cpu().clone(), aux[r, :length].to(torch.bfloat16).cpu().clone(),
                                values.to(torch.float16).cpu(), ids.to(torch.int32).cpu(), top_from,
                                samples[i].kind)
    return [found[i] for i in range(len(samples))]


def collate(features: list[Features], columns: torch.Tensor, device: torch.device) -> dict:
    """batch_tensors() for cached features, padded, on `device`."""
    width, k = max(len(f.token_ids) for f in features), features[0].top_ids.shape[1]
    batch = len(features)
    input_ids = torch.zeros(batch, width, dtype=torch.long)
    aux = torch.zeros(batch, width, features[0].aux.shape[1], dtype=torch.bfloat16)
    values = torch.zeros(batch, width, k, dtype=torch.float16)
    ids = torch.zeros(batch, width, k, dtype=torch.int32)
    known = torch.zeros(batch, width, dtype=torch.bool)
    for r, f in enumerate(features):
        length = len(f.token_ids)
        input_ids[r, :length], aux[r, :length] = f.token_ids, f.aux
        values[r, f.top_from:length], ids[r, f.top_from:length] = f.top_values, f.top_ids
        known[r, f.top_from:length] = True
    tensors = (input_ids, aux, values, ids, known)
    return batch_tensors(*(t.to(device, non_blocking=True) for t in tensors), columns.to(device))


class FeatureBatches:
    """Training batches from cached features."""

    def __init__(self, features: list[Features], columns: torch.Tensor):
        self.features, self.columns = features, columns
        self.lengths = [len(f.token_ids) for f in features]

    def batch(self, indices: list[int], device: torch.device) -> dict:
        return collate([self.features[i] for i in indices], self.columns, device)


class LiveBatches:
    """Training batches with the target read on the fly: its forward over the batch's samples, the
    top-k taken on the device, nothing kept."""

    def __init__(self, teacher, samples: list[Sample], layer_ids: list[int], top_k: int, columns: torch.Tensor,
                 max_len: int = MAX_LEN, learn_prompts: bool = False):
        self.teacher, self.samples, self.layer_ids, self.top_k = teacher, samples, layer_ids, top_k
        self.columns, self.max_len, self.learn_prompts = columns, max_len, learn_prompts
        self.lengths = [min(len(s.token_ids), max_len) for s in samples]

    @torch.no_grad()
    def batch(self, indices: list[int], device: torch.device) -> dict:
        samples = [self.samples[i] for i in indices]
        input_ids, attention = _padded([s.token_ids[:self.max_len] for s in samples], device)
        aux, last = _read(self.teacher, input_ids, attention, self.layer_ids)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            values, ids = self.teacher.lm_head(last).topk(self.top_k, dim=-1)
        positions = torch.arange(input_ids.shape[1], device=device)
        first = torch.tensor([_first_learnt(s, self.learn_prompts) for s in samples], device=device)
        known = attention.bool() & (positions[None, :] >= first[:, None])
        return batch_tensors(input_ids, aux.to(torch.bfloat16), values, ids, known, self.columns.to(device))


def read_cached(cache: Path) -> list[Features]:
    """Every shard cached_features() kept in `cache`, in order."""
    shards = sorted(Path(cache).glob("shard-*.pt"))
    return [Features(**d) for shard in shards for d in torch.load(shard, weights_only=True)]


def as_sample(f: Features) -> Sample:
    """The sample a feature was read from (its learnt positions as the answer)."""
    return Sample(f.token_ids.tolist(), f.top_from + 1 if f.top_from else 0, f.kind)


def cached_features(cache: Path, teacher, samples: list[Sample], layer_ids: list[int], top_k: int,
                    batch_tokens: int, max_len: int, progress: Callable[[int], None] | None = None,
                    deadline: float | None = None, learn_prompts: bool = False) -> list[Features]:
    """teacher_features over samples, SHARD_SAMPLES at a time, each shard saved in `cache` and read
    back from there when it exists. Stops early (fewer features) once the monotonic deadline passes."""
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
            made = teacher_features(teacher, part, layer_ids, top_k, batch_tokens, max_len, learn_prompts)
            torch.save([f.to_dict() for f in made], shard.with_suffix(".tmp"))
            shard.with_suffix(".tmp").replace(shard)
        features += made
        if progress:
            progress(sum(len(f.token_ids) for f in made))
    return features
