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

from scheduler.distill.features import FeatureBatches, Features, column_map
from scheduler.distill.train import length_groups
from scheduler.speculative.eagle.head import EagleHead

CHECKPOINT = "checkpoint.pt"
REWARM_STEPS = 50  # steps over which fresh optimiser moments warm up on a stripped checkpoint


@dataclass
class HeadTrainConfig:
    unroll: int = 4  # draft steps trained at once (training-time test)
    step_weight: float = 0.8  # loss weight of step s: step_weight ** s
    lr: float = 1e-3
    batch_tokens: int = 4096  # padded tokens per optimiser step
    epochs: float = 4.0
    max_seconds: float = math.inf  # this call's training time
    total_seconds: float | None = None  # planned over all calls of a resumed run: the schedule's length
    warmup: float = 0.03
    checkpoint_seconds: float = 120.0
    seed: int = 0


def batches_for_epoch(lengths: list[int], batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """Sample indices grouped by similar length (at most batch_tokens padded tokens), in an order that
    depends only on (seed, epoch): a resumed run sees the same batches."""
    rng = random.Random(seed * 1_000_003 + epoch)
    groups = length_groups(lengths, batch_tokens, rng)
    rng.shuffle(groups)
    return groups


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
    """The head's weights as they are (float32) and the optimiser's moments in bfloat16 (~40 MB for the
    default model's head rather than ~60: what carries a run from one leased machine to the next).
    Loading casts them back to the weights' dtype."""
    optimizer_state = optimizer.state_dict()
    optimizer_state["state"] = {
        index: {name: t.to(torch.bfloat16) if t.is_floating_point() and t.dim() > 0 else t
                for name, t in moments.items()}
        for index, moments in optimizer_state["state"].items()}
    tmp = path.with_suffix(".tmp")
    torch.save({"head": head.state_dict(), "optimizer": optimizer_state, "state": state}, tmp)
    tmp.replace(path)


def strip_checkpoint(path: Path) -> int:
    """Drop the optimiser's moments from a checkpoint (half its size: what a run carried between leased
    machines can afford); a resumed run then warms fresh ones up. Returns the new size in bytes."""
    saved = torch.load(path, weights_only=True)
    saved.pop("optimizer", None)
    tmp = path.with_suffix(".tmp")
    torch.save(saved, tmp)
    tmp.replace(path)
    return path.stat().st_size


def train_head(head: EagleHead, data: FeatureBatches | list[Features], config: HeadTrainConfig, out: Path,
               resume: bool = False, show_progress: bool = True) -> dict:
    """Train `head` (bound to the target's embeddings and LM head) in place for config.epochs passes or
    config.max_seconds, whichever ends first, checkpointing into out/checkpoint.pt. `data` gives the
    batches (features.FeatureBatches or LiveBatches; a list of Features is cached features). With
    resume, the checkpoint there is loaded first and training carries on from it. Returns training
    statistics."""
    from tqdm.auto import tqdm

    device = head.fc.weight.device
    if isinstance(data, list):
        data = FeatureBatches(data, column_map(head.vocab_ids, head.config["vocab_size"]))
    trainable = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    batches_per_epoch = len(batches_for_epoch(data.lengths, config.batch_tokens, config.seed, 0))
    total_steps = max(1, math.ceil(config.epochs * batches_per_epoch))
    state = {"step": 0, "progress": 0.0, "seconds": 0.0, "tokens": 0, "loss": None, "agreement": None}
    checkpoint = out / CHECKPOINT
    if resume and checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=True)
        head.load_state_dict(saved["head"])
        state = dict(saved["state"], seconds_before=saved["state"]["seconds"])
        if "optimizer" in saved:
            optimizer.load_state_dict(saved["optimizer"])
        else:  # a checkpoint carried without the optimiser's moments (strip_checkpoint): warm them up again
            state["rewarm_from"] = state["step"]
    torch.manual_seed(config.seed + state["step"])
    # A resumed run goes on towards config.epochs within its own max_seconds: the learning rate picks up the
    # schedule where the steps done put it and decays by whichever of steps and time runs out first (time:
    # this call's, or with total_seconds the time of all calls together, so several calls make one schedule).
    start, last_save, base_progress = time.monotonic(), time.monotonic(), min(state["step"] / total_steps, 1.0)
    head.train()
    bar = tqdm(total=total_steps, initial=min(state["step"], total_steps), desc="training head", unit="step",
               disable=not show_progress, mininterval=1.0)
    epoch_batches = (-1, None)
    while True:
        elapsed = time.monotonic() - start
        if config.total_seconds:
            timed = (state.get("seconds_before", 0.0) + elapsed) / config.total_seconds
        else:
            timed = base_progress + (1 - base_progress) * elapsed / config.max_seconds
        progress = max(state["step"] / total_steps, timed)
        if progress >= 1 or elapsed >= config.max_seconds:
            break
        epoch, index = divmod(state["step"], batches_per_epoch)
        if epoch_batches[0] != epoch:
            epoch_batches = (epoch, batches_for_epoch(data.lengths, config.batch_tokens, config.seed, epoch))
        batch = data.batch(epoch_batches[1][index], device)
        rewarm = min(1.0, (state["step"] - state.get("rewarm_from", -REWARM_STEPS) + 1) / REWARM_STEPS)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, progress) * rewarm
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
