"""The step limits an engine takes when its config leaves them unset: max_num_batched_tokens and
max_num_seqs, chosen once at start-up from the device, its memory and the model's weights.

| device | memory    | weights          | max_num_batched_tokens (offline / daemon) | max_num_seqs |
|--------|-----------|------------------|-------------------------------------------|--------------|
| cpu    | any       | any              | 2048 / 2048                               | 256          |
| cuda   | >= 70 GiB | <= half of it    | 16384 / 8192                              | 1024         |
| cuda   | < 70 GiB  | <= half of it    | 8192 / 2048                               | 256          |
| cuda   | any       | over half of it  | 2048 / 2048                               | 256          |

A big GPU has the compute to fill larger steps and the memory for the KV cache of more sequences.
The daemon's budget is smaller than the offline one because a step's prompt tokens delay every
stream's next token. When the weights take over half the memory, the activations a larger step
reserves would come out of a small KV cache, so the limits stay at the CPU's.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from scheduler.config import EngineConfig

log = logging.getLogger(__name__)

GiB = 1 << 30
BIG_GPU_BYTES = 70 * GiB
CPU_DEFAULTS = (2048, 256)  # also for a model that leaves a GPU little room


def resolved_defaults(device: torch.device, total_memory_bytes: int, weight_bytes: int,
                      serving: bool = False) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) for this device: the table in this module's docstring.
    total_memory_bytes is one device's memory, weight_bytes the weights it holds; serving: for the
    daemon rather than offline use."""
    if device.type != "cuda" or weight_bytes > total_memory_bytes // 2:
        return CPU_DEFAULTS
    if total_memory_bytes >= BIG_GPU_BYTES:
        return (8192 if serving else 16384), 1024
    return (2048 if serving else 8192), 256


def resolve_engine_config(config: EngineConfig, device: torch.device, model: torch.nn.Module,
                          serving: bool = False) -> EngineConfig:
    """config with its unset step limits chosen for this device and model (weights already on it);
    explicit values stay as they are. Logs what it chose."""
    unset = [name for name in ("max_num_batched_tokens", "max_num_seqs") if getattr(config, name) is None]
    if not unset:
        return config
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, total = props.name, props.total_memory
        where = f"{name} ({total / GiB:.0f} GiB{', daemon' if serving else ''})"
    else:
        total, where = 0, str(device)
    chosen = dict(zip(("max_num_batched_tokens", "max_num_seqs"), resolved_defaults(
        device, total, model_weight_bytes(model), serving)))
    chosen = {name: chosen[name] for name in unset}
    log.info("engine defaults for %s: %s (set --max-num-seqs/--max-num-batched-tokens to override)", where,
             ", ".join(f"{name}={value}" for name, value in chosen.items()))
    return replace(config, **chosen)


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (a tied weight once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
    return sum(t.numel() * t.element_size() for t in tensors)
