"""Engine configuration: one dataclass, validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


@dataclass
class EngineConfig:
    model: Any = "default"  # "default", a GGUF file, a HF directory, or a transformers config (dummy weights)
    tokenizer: str | None = None  # defaults to the model's own
    device: str = "auto"  # auto = cuda when present, else cpu
    dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU
    load_format: str = "auto"  # auto = the checkpoint's weights; dummy = random weights of the real shape
    max_model_len: int | None = None  # prompt + output cap; defaults to the model's context length
    block_size: int = 16
    kv_cache_bytes: int | None = None  # default: 1 GiB on CPU; on CUDA, what gpu_memory_utilization leaves
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False  # CUDA: no CUDA graphs (the fused kernels still run); for debugging
    max_num_batched_tokens: int = 2048  # token budget of one step
    max_num_seqs: int = 256  # sequences running at once
    enable_prefix_caching: bool = True
    priority_aging_s: float = 10.0  # each this many seconds waiting lowers the priority value by one
    seed: int = 0  # for unseeded sampling
    speculative: str = "off"  # off | draft | ngram
    draft_model: Any = None  # what `model` accepts, or a compact draft; None: the one shipped for the target
    num_speculative_tokens: int = 4  # most tokens drafted per sequence per step
    adaptive_speculation: bool = True  # choose k per step from measured acceptance and cost (else always k)
    ngram_min: int = 2
    ngram_max: int = 4

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.speculative not in ("off", "draft", "ngram"):
            raise ValueError(f"speculative must be off, draft or ngram, got {self.speculative!r}")
        if not isinstance(self.num_speculative_tokens, int) or not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto, {', '.join(_DTYPES)}; got {self.dtype!r}")
        if self.device not in ("auto", "cpu") and not str(self.device).startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")

    @property
    def max_query_len(self) -> int:
        """Most tokens one sequence computes in a decode step: itself and its drafts."""
        return 1 + (self.num_speculative_tokens if self.speculative != "off" else 0)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return _DTYPES[self.dtype]
