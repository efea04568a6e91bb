"""How many KV blocks fit: a byte budget on CPU, a share of free memory on CUDA.

On CUDA what a step needs beside the weights is measured, as vLLM's profile run does: the largest steps run once
over a scratch KV cache before the real one is sized, and the allocator's peak says what they took."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from scheduler.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from scheduler.worker.runner import kv_bytes_per_block

log = logging.getLogger(__name__)


@dataclass
class KVCachePlan:
    num_blocks: int
    num_bytes: int


def plan_kv_cache(config: EngineConfig, model_configs: list, dtype: torch.dtype, device: torch.device,
                  step_peak: StepPeak | None = None) -> KVCachePlan:
    """Call after the weights are on the device, so free memory already excludes them. With a
    draft model, each block holds the target's and the draft's KV for the same tokens. Under tensor
    parallelism, the blocks of rank 0: the target's share of the KV heads, and the whole draft's.
    step_peak: what the largest steps measured (measure_step_peak); else an estimate from the shape."""
    model_config = model_configs[0]
    per_block = kv_bytes_per_block(model_config, config.block_size, dtype, config.tensor_parallel_size)
    per_block += sum(kv_bytes_per_block(c, config.block_size, dtype) for c in model_configs[1:])
    budget = config.kv_cache_bytes
    if budget is None:
        budget = _cuda_budget(config, model_config, device, step_peak) if device.type == "cuda" \
            else DEFAULT_CPU_KV_CACHE_BYTES
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise ValueError(f"kv_cache_bytes {budget} holds no block; one block of {config.block_size} tokens "
                         f"needs {per_block} bytes")
    return KVCachePlan(num_blocks, num_blocks * per_block)


@dataclass
class StepPeak:
    """Bytes beyond the weights and the KV cache that steps take at their largest."""

    forward: int  # the hidden states and intermediates of the largest step's forward (also a captured graph's pool)
    logits: int  # what the largest decode step (its logits and the sampler's work on them) needs beyond that

    def reserve(self, graphs: bool) -> int:
        # A captured graph keeps its intermediates in a private pool, so eager steps need their own room beside it.
        return self.forward * (2 if graphs else 1) + self.logits


def measure_step_peak(model, config: EngineConfig, dtype: torch.dtype, device: torch.device,
                      max_positions: int) -> StepPeak:
    """Runs the largest prompt step (max_num_batched_tokens new tokens, in sequences no longer than the model
    takes) and the largest decode step (max_num_seqs sequences of 1 + k tokens, logits for each) once, over a
    scratch KV cache just large enough, and reads the allocator's peak above what was there before."""
    from scheduler.worker.runner import ForwardItem, ModelRunner

    bs = config.block_size
    tokens = max(config.max_num_batched_tokens, config.max_num_seqs * config.max_query_len)
    lengths = [min(max_positions, tokens - done) for done in range(0, tokens, max_positions)]
    num_blocks = sum(-(-n // bs) for n in lengths)
    runner = ModelRunner(model, num_blocks, bs, dtype, device)
    first_block = 0
    prompts = []
    for n in lengths:
        prompts.append(ForwardItem([0] * n, 0, list(range(first_block, first_block + -(-n // bs))), 1))
        first_block += -(-n // bs)
    # Every decode row writes the same scratch slot: only the shapes matter here.
    decodes = [ForwardItem([0] * config.max_query_len, 0, [0], config.max_query_len)
               for _ in range(config.max_num_seqs)]
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.forward(prompts)
    torch.cuda.synchronize(device)
    forward = torch.cuda.max_memory_allocated(device) - base
    torch.cuda.reset_peak_memory_stats(device)
    logits = runner.forward(decodes)
    # The sampler's copies of the rows' logits: probabilities and a sorted copy for top-p/top-k run here; one more
    # copy (cumulative sums) is added below rather than run.
    with torch.inference_mode():
        probs = logits.softmax(-1)
        torch.sort(probs, dim=-1, descending=True)
    torch.cuda.synchronize(device)
    decode_peak = torch.cuda.max_memory_allocated(device) - base
    del runner, logits, probs
    torch.cuda.empty_cache()
    return StepPeak(forward=forward, logits=max(0, decode_peak - forward) + logits_bytes(config, model.config))


def logits_bytes(config: EngineConfig, model_config) -> int:
    return config.max_num_seqs * config.max_query_len * model_config.vocab_size * 4


def estimated_step_peak(config: EngineConfig, model_config) -> StepPeak:
    """Where the step cannot run alone (tensor parallelism: every rank takes part): hidden states and MLP
    intermediates of every batched token in fp32, and three fp32 copies of every sampled row's logits."""
    per_token = (6 * model_config.hidden_size + 3 * model_config.intermediate_size) * 4
    tokens = max(config.max_num_seqs * config.max_query_len, config.max_num_batched_tokens)
    return StepPeak(forward=tokens * per_token, logits=3 * logits_bytes(config, model_config))


def _cuda_budget(config: EngineConfig, model_config, device: torch.device, step_peak: StepPeak | None) -> int:
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free
    step_peak = step_peak or estimated_step_peak(config, model_config)
    reserve = step_peak.reserve(graphs=not config.enforce_eager)
    budget = int(total * config.gpu_memory_utilization) - used_by_others - reserve
    log.info("GPU memory: %.1f GiB in use before the KV cache (weights and others), %.2f GiB kept for steps "
             "(forward %.2f GiB%s, logits %.2f GiB), %.1f GiB for the KV cache", used_by_others / 2**30,
             reserve / 2**30, step_peak.forward / 2**30, " twice: eager and graphs" if not config.enforce_eager
             else "", step_peak.logits / 2**30, max(budget, 0) / 2**30)
    if budget <= 0:
        raise ValueError(f"no GPU memory left for the KV cache at gpu_memory_utilization="
                         f"{config.gpu_memory_utilization}: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
    return budget
