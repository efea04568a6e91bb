"""A draft made from its target: the target's embeddings, LM head and a few of its layers, trained
to match the target's next-token distribution on the target's own answers.

Training uses transformers models (our forward serves over a paged KV cache; training wants a
plain one). Our parameter names are Hugging Face's, so weights move between the two as they are.
The loss compares the draft's distribution with the target's top-k tokens, renormalised (k bounds
the memory of the target's side, which is computed once and kept for later epochs): forward KL by
default, or total-variation distance, which is exactly one minus the rate at which sampled drafts
are accepted.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass

import torch

from scheduler.distill.data import Sample

LOSSES = ("kl", "tv")


@dataclass
class TrainConfig:
    top_k: int = 64
    loss: str = "kl"
    lr: float = 1e-3
    batch_tokens: int = 16384  # padded tokens per step
    epochs: float = 4.0
    max_seconds: float = math.inf
    warmup: float = 0.03  # share of training spent warming the learning rate up
    max_len: int = 1024  # longer samples are cut
    seed: int = 0


def hf_model(our_model, device: torch.device, dtype: torch.dtype):
    """A transformers copy of one of our models (same weights), for training-style forwards."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(our_model.config, dtype=dtype)
    model.load_state_dict(our_model.hf_state_dict())
    return model.eval().requires_grad_(False)


def draft_layer_ids(num_target_layers: int, num_layers: int) -> list[int]:
    """The target's first layers. Later layers expect the residual stream that all the layers before
    them built; fed an early one (e.g. first and last layer of SmolLM2-135M), the draft starts from
    a KL of ~60 nats against ~18 and learns more slowly."""
    assert 1 <= num_layers <= num_target_layers
    return list(range(num_layers))


def init_draft(target, num_layers: int):
    """A num_layers-layer copy of `target` (a transformers model) in fp32: its embeddings, final norm,
    LM head and chosen layers. Embeddings and LM head are frozen: the compact form borrows them."""
    from transformers import AutoModelForCausalLM

    chosen = draft_layer_ids(target.config.num_hidden_layers, num_layers)
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in chosen]
    device = target.model.embed_tokens.weight.device
    with torch.device(device):
        draft = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for name, tensor in target.state_dict().items():
        if name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            if int(index) not in chosen:
                continue
            name = f"model.layers.{chosen.index(int(index))}.{rest}"
        state[name] = tensor.float()
    draft.load_state_dict(state)
    draft.model.embed_tokens.requires_grad_(False)
    draft.lm_head.requires_grad_(False)
    return draft


def length_groups(lengths: list[int], batch_tokens: int, rng: random.Random | None = None) -> list[list[int]]:
    """Indices grouped with others of similar length, at most batch_tokens padded tokens a group (rng
    breaks ties between equal lengths)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random() if rng else 0.0))
    groups, group, width = [], [], 0
    for i in order:
        if group and max(width, lengths[i]) * (len(group) + 1) > batch_tokens:
            groups.append(group)
            group, width = [], 0
        group.append(i)
        width = max(width, lengths[i])
    return groups + [group] if group else groups


def make_batches(samples: list[Sample], batch_tokens: int, max_len: int, rng: random.Random) -> list[tuple]:
    """(input_ids, attention_mask, loss_mask) batches of similar lengths, right-padded, at most
    batch_tokens padded tokens each. The loss covers the positions that predict answer tokens."""
    groups = length_groups([min(len(s.token_ids), max_len) for s in samples], batch_tokens, rng)
    rng.shuffle(groups)
    return [_pad([samples[i] for i in g], max_len) for g in groups]


def _pad(samples: list[Sample], max_len: int) -> tuple:
    width = max(min(len(s.token_ids), max_len) for s in samples)
    input_ids = torch.zeros(len(samples), width, dtype=torch.long)
    attention = torch.zeros(len(samples), width, dtype=torch.long)
    loss_mask = torch.zeros(len(samples), width, dtype=torch.bool)
    for row, s in enumerate(samples):
        ids = s.token_ids[:max_len]
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention[row, :len(ids)] = 1
        loss_mask[row, s.num_prompt_tokens - 1:len(ids) - 1] = True
    return input_ids, attention, loss_mask


def _masked_logits(model, batch: tuple, autocast: bool) -> torch.Tensor:
    input_ids, attention, loss_mask = batch
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        hidden = model.model(input_ids=input_ids, attention_mask=attention, use_cache=False).last_hidden_state
        return model.lm_head(hidden[loss_mask]).float()


@torch.no_grad()
def target_top_k(teacher, batch: tuple, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's top-k logits (float16) and their token ids at every answer position of the batch."""
    values, ids = _masked_logits(teacher, batch, batch[0].device.type == "cuda").topk(top_k, dim=-1)
    return values.to(torch.float16), ids.to(torch.int32)


def batch_loss(target_top: tuple, draft, batch: tuple, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, agreement): the draft against the target's top-k distribution at every answer position;
    agreement is the share of positions where their argmax tokens are the same."""
    top_values, top_ids = target_top[0].float(), target_top[1].long()
    log_p = top_values.log_softmax(-1)
    draft_logits = _masked_logits(draft, batch, batch[0].device.type == "cuda")
    log_q = draft_logits.log_softmax(-1).gather(1, top_ids)
    if loss == "kl":
        value = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    else:  # the draft's mass outside the target's top-k counts in full
        q = log_q.exp()
        value = 0.5 * ((log_p.exp() - q).abs().sum(-1) + 1 - q.sum(-1)).mean()
    agreement = (draft_logits.argmax(-1) == top_ids[:, 0]).float().mean()
    return value, agreement.detach()


@torch.no_grad()
def agreement(teacher, draft, samples: list[Sample], batch_tokens: int = 16384, max_len: int = 1024) -> float:
    """Share of answer positions where the draft's argmax is the target's."""
    device = draft.model.embed_tokens.weight.device
    agreed = total = 0
    for batch in make_batches(samples, batch_tokens, max_len, random.Random(0)):
        batch = tuple(t.to(device) for t in batch)
        autocast = device.type == "cuda"
        target_top = _masked_logits(teacher, batch, autocast).argmax(-1)
        agreed += (_masked_logits(draft, batch, autocast).argmax(-1) == target_top).sum().item()
        total += target_top.numel()
    return agreed / max(total, 1)


def learning_rate(config: TrainConfig, progress: float) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if progress < config.warmup:
        return config.lr * progress / config.warmup
    done = (progress - config.warmup) / (1 - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))


def train(teacher, draft, samples: list[Sample], config: TrainConfig, show_progress: bool = True) -> dict:
    """Train `draft` in place for config.epochs passes or config.max_seconds, whichever ends first
    (the learning-rate schedule follows whichever is further along). Returns training statistics."""
    from tqdm.auto import tqdm

    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    device = draft.model.embed_tokens.weight.device
    batches = make_batches(samples, config.batch_tokens, config.max_len, rng)
    total_steps = max(1, math.ceil(config.epochs * len(batches)))
    target_tops: dict[int, tuple] = {}  # batch index -> the target's top-k at its answer positions
    trainable = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    draft.train()
    start, step, tokens = time.monotonic(), 0, 0
    loss_avg = agree_avg = first_agreement = None
    bar = tqdm(total=total_steps, desc="distilling", unit="step", disable=not show_progress, mininterval=1.0)
    while True:
        progress = max(step / total_steps, (time.monotonic() - start) / config.max_seconds)
        if progress >= 1:
            break
        index = step % len(batches)
        tokens += int(batches[index][2].sum())  # on the host: no sync
        batch = tuple(t.to(device, non_blocking=True) for t in batches[index])
        if index not in target_tops:  # the target's side is computed once, on the first pass
            target_tops[index] = target_top_k(teacher, batch, config.top_k)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, progress)
        loss, agree = batch_loss(target_tops[index], draft, batch, config.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        step += 1
        if step % 10 == 1 or step == total_steps:  # one host sync every few steps
            loss_now, agree_now = loss.item(), agree.item()
            first_agreement = agree_now if first_agreement is None else first_agreement
            loss_avg = loss_now if loss_avg is None else 0.8 * loss_avg + 0.2 * loss_now
            agree_avg = agree_now if agree_avg is None else 0.8 * agree_avg + 0.2 * agree_now
            bar.set_postfix(loss=f"{loss_avg:.3f}", agree=f"{agree_avg:.3f}", refresh=False)
        bar.update(1)
        if step % len(batches) == 0:  # a new epoch: the same batches, in another order
            order = list(range(len(batches)))
            rng.shuffle(order)
            batches, target_tops = [batches[i] for i in order], {n: target_tops[i] for n, i in enumerate(order)}
    bar.close()
    draft.eval()
    return {"steps": step, "epochs": round(step / len(batches), 2), "trained_tokens": tokens,
            "seconds": round(time.monotonic() - start, 1), "loss": loss_avg, "agreement": agree_avg,
            "first_batch_agreement": first_agreement}
