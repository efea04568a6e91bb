"""How many KV blocks fit: a byte budget on CPU, a share of free memory on CUDA."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scheduler.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from scheduler.worker.runner import kv_bytes_per_block


@dataclass
class KVCachePlan:
    num_blocks: int
    num_bytes: int


def plan_kv_cache(config: EngineConfig, model_configs: list, dtype: torch.dtype, device: torch.device) -> KVCachePlan:
    """Call after the weights are on the device, so free memory already excludes them. With a
    draft model, each block holds the target's and the draft's KV for the same tokens. Under tensor
    parallelism, the blocks of rank 0: the target's share of the KV heads, and the whole draft's."""
    model_config = model_configs[0]
    per_block = kv_bytes_per_block(model_config, config.block_size, dtype, config.tensor_parallel_size)
    per_block += sum(kv_bytes_per_block(c, config.block_size, dtype) for c in model_configs[1:])
    budget = config.kv_cache_bytes
    if budget is None:
        budget = _cuda_budget(config, model_config, device) if device.type == "cuda" else DEFAULT_CPU_KV_CACHE_BYTES
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise ValueError(f"kv_cache_bytes {budget} holds no block; one block of {config.block_size} tokens "
                         f"needs {per_block} bytes")
    return KVCachePlan(num_blocks, num_blocks * per_block)


def _cuda_budget(config: EngineConfig, model_config, device: torch.device) -> int:
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free
    # Activations of the largest step: hidden states and MLP intermediates of every batched token,
    # plus fp32 logits for every row that samples (1 + k per sequence when verifying drafts).
    per_token = (6 * model_config.hidden_size + 3 * model_config.intermediate_size) * 4
    activations = config.max_num_batched_tokens * per_token
    activations += config.max_num_seqs * config.max_query_len * model_config.vocab_size * 4 * 3
    if not config.enforce_eager:
        # CUDA graphs keep a private pool: the intermediates of the largest captured batch (decodes
        # with their drafts, or a step with prompt chunks).
        activations += max(config.max_num_seqs * config.max_query_len, config.max_num_batched_tokens) * per_token
    budget = int(total * config.gpu_memory_utilization) - used_by_others - activations
    if budget <= 0:
        raise ValueError(f"no GPU memory left for the KV cache at gpu_memory_utilization="
                         f"{config.gpu_memory_utilization}: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
    return budget
