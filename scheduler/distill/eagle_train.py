"""Training an EAGLE head, EAGLE-3 style: the head reads the target's hidden states and the next
token's embedding, is unrolled several draft steps feeding its own output hidden states back
("training-time test", EagleHead.unroll), and at every step is pulled towards the target's
next-token distribution there (cross-entropy against the target's top-k, renormalised over the
head's vocabulary; later steps weigh 0.8x the one before). Checkpoints hold the head, the optimiser
and where training stands, so `--resume` carries on where a run stopped."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from scheduler.distill.features import Features
from scheduler.distill.train import length_groups
from scheduler.speculative.eagle.head import EagleHead

CHECKPOINT = "checkpoint.pt"


@dataclass
class HeadTrainConfig:
    unroll: int = 4  # draft steps trained at once (training-time test)
    step_weight: float = 0.8  # loss weight of step s: step_weight ** s
    lr: float = 1e-3
    batch_tokens: int = 4096  # padded tokens per optimiser step
    epochs: float = 4.0
    max_seconds: float = math.inf
    warmup: float = 0.03
    checkpoint_seconds: float = 120.0
    seed: int = 0


def column_map(vocab_ids: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """token id -> the head's logits column (-1: a token the head never proposes)."""
    if vocab_ids is None:
        return torch.arange(vocab_size)
    columns = torch.full((vocab_size,), -1, dtype=torch.long)
    columns[vocab_ids.long()] = torch.arange(len(vocab_ids))
    return columns


def batches_for_epoch(features: list[Features], batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """Feature indices grouped by similar length (at most batch_tokens padded tokens), in an order that
    depends only on (seed, epoch): a resumed run sees the same batches."""
    rng = random.Random(seed * 1_000_003 + epoch)
    groups = length_groups([len(f.token_ids) for f in features], batch_tokens, rng)
    rng.shuffle(groups)
    return groups


def collate(features: list[Features], columns: torch.Tensor, device: torch.device) -> dict:
    """Padded tensors for a batch: tokens, the target's hidden states, and at every position the
    target's top-k as head columns (-1 outside its vocabulary) with their renormalised probabilities,
    the target's greedy token, and whether the position is trained on."""
    width, k = max(len(f.token_ids) for f in features), features[0].top_ids.shape[1]
    batch = len(features)
    input_ids = torch.zeros(batch, width, dtype=torch.long)
    aux = torch.zeros(batch, width, features[0].aux.shape[1], dtype=torch.bfloat16)
    cols = torch.full((batch, width, k), -1, dtype=torch.long)
    logits = torch.full((batch, width, k), -math.inf)
    greedy = torch.full((batch, width), -1, dtype=torch.long)
    for r, f in enumerate(features):
        length = len(f.token_ids)
        input_ids[r, :length], aux[r, :length] = f.token_ids, f.aux
        cols[r, f.top_from:length] = columns[f.top_ids.long()]
        logits[r, f.top_from:length] = f.top_values.float()
        greedy[r, f.top_from:length] = f.top_ids[:, 0].long()
    logits = logits.masked_fill(cols < 0, -math.inf)
    valid = logits.isfinite().any(-1)
    probs = torch.where(valid[..., None], logits.softmax(-1), 0.0).nan_to_num(0.0)
    tensors = dict(input_ids=input_ids, aux=aux, cols=cols.clamp(min=0), probs=probs, greedy=greedy, valid=valid,
                   known=greedy >= 0)
    return {name: t.to(device, non_blocking=True) for name, t in tensors.items()}


def _shifted(t: torch.Tensor, shift: int, fill) -> torch.Tensor:
    """t[:, shift:] padded back to its length: row i of step s is judged at position i + 1 + s."""
    pad = t.new_full((t.shape[0], shift, *t.shape[2:]), fill)
    return torch.cat([t[:, shift:], pad], dim=1)


def unrolled_loss(head: EagleHead, batch: dict, steps: int, step_weight: float) -> tuple[torch.Tensor, list]:
    """(weighted loss over the unrolled steps, per step (agreed, judged) counts as tensors): agreement
    is the head's greedy token being the target's."""
    autocast = batch["input_ids"].device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        outputs = head.unroll(batch["input_ids"], batch["aux"].float(), steps)
    total, counts = 0.0, []
    for s, hidden in enumerate(outputs):
        valid = _shifted(batch["valid"], 1 + s, False)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = head.logits(hidden[valid]).float()
        log_q = logits.log_softmax(-1)
        cols, probs = _shifted(batch["cols"], 1 + s, 0)[valid], _shifted(batch["probs"], 1 + s, 0.0)[valid]
        loss = -(probs * log_q.gather(1, cols)).sum(-1).mean() if len(cols) else log_q.sum() * 0
        total = total + step_weight ** s * loss
        greedy = _shifted(batch["greedy"], 1 + s, -1)[valid]
        counts.append(((head.token_ids(logits.argmax(-1)) == greedy).sum().detach(), valid.sum()))
    return total, counts


def learning_rate(config: HeadTrainConfig, progress: float) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if progress < config.warmup:
        return config.lr * max(progress, 1e-3) / config.warmup
    done = (progress - config.warmup) / (1 - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))


def save_checkpoint(path: Path, head: EagleHead, optimizer, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"head": head.state_dict(), "optimizer": optimizer.state_dict(), "state": state}, tmp)
    tmp.replace(path)


def train_head(head: EagleHead, features: list[Features], config: HeadTrainConfig, out: Path, resume: bool = False,
               show_progress: bool = True) -> dict:
    """Train `head` (bound to the target's embeddings and LM head) in place for config.epochs passes or
    config.max_seconds, whichever ends first, checkpointing into out/checkpoint.pt. With resume, the
    checkpoint there is loaded first and training carries on from it. Returns training statistics."""
    from tqdm.auto import tqdm

    device = head.fc.weight.device
    columns = column_map(head.vocab_ids.cpu() if head.vocab_ids is not None else None,
                         head.config["vocab_size"])
    trainable = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    batches_per_epoch = len(batches_for_epoch(features, config.batch_tokens, config.seed, 0))
    total_steps = max(1, math.ceil(config.epochs * batches_per_epoch))
    state = {"step": 0, "progress": 0.0, "seconds": 0.0, "tokens": 0, "loss": None, "agreement": None}
    checkpoint = out / CHECKPOINT
    if resume and checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=True)
        head.load_state_dict(saved["head"])
        optimizer.load_state_dict(saved["optimizer"])
        state = dict(saved["state"], seconds_before=saved["state"]["seconds"])
    torch.manual_seed(config.seed + state["step"])
    # A resumed run goes on towards config.epochs within its own max_seconds: the learning rate picks up the
    # schedule where the steps done put it and decays by whichever of steps and time runs out first.
    start, last_save, base_progress = time.monotonic(), time.monotonic(), min(state["step"] / total_steps, 1.0)
    head.train()
    bar = tqdm(total=total_steps, initial=min(state["step"], total_steps), desc="training head", unit="step",
               disable=not show_progress, mininterval=1.0)
    epoch_batches = (-1, None)
    while True:
        elapsed = time.monotonic() - start
        progress = max(state["step"] / total_steps, base_progress + (1 - base_progress) * elapsed / config.max_seconds)
        if progress >= 1:
            break
        epoch, index = divmod(state["step"], batches_per_epoch)
        if epoch_batches[0] != epoch:
            epoch_batches = (epoch, batches_for_epoch(features, config.batch_tokens, config.seed, epoch))
        batch = collate([features[i] for i in epoch_batches[1][index]], columns, device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, progress)
        loss, counts = unrolled_loss(head, batch, config.unroll, config.step_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        state["step"] += 1
        state["tokens"] += int(batch["valid"].sum())
        if state["step"] % 10 == 1:  # one host sync every few steps
            agreement = [round(int(a) / max(int(n), 1), 3) for a, n in counts]
            state["loss"] = round(loss.item(), 4)
            state["agreement"] = agreement
            bar.set_postfix(loss=f"{state['loss']:.3f}", agree="/".join(f"{a:.2f}" for a in agreement), refresh=False)
        bar.update(1)
        state["progress"] = progress
        state["seconds"] = round(state.get("seconds_before", 0.0) + time.monotonic() - start, 1)
        if time.monotonic() - last_save > config.checkpoint_seconds:
            save_checkpoint(checkpoint, head, optimizer, state)
            last_save = time.monotonic()
    bar.close()
    save_checkpoint(checkpoint, head, optimizer, state)
    head.eval()
    return {"steps": state["step"], "epochs": round(state["step"] / batches_per_epoch, 2),
            "trained_positions": state["tokens"], "seconds": state["seconds"], "loss": state["loss"],
            "agreement_by_step": state["agreement"], "unroll": config.unroll}
