"""Engine configuration: one dataclass, validated once. Its fields are also `beastserve serve`'s
flags (server/options.py builds them from `fields(EngineConfig)`), so each field's help text and
choices live here, in its metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch's dtypes by their names; torch itself is imported only when a device or dtype is asked for, so the
# command line's client commands and `serve --help` never load it.
_DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
# speculative= names and the proposer classes they build (scheduler/speculative/registry.py imports them
# lazily). A new method is one file and one line here.
PROPOSERS = {
    "ngram": "scheduler.speculative.ngram:NgramProposer",
    "draft": "scheduler.speculative.draft.proposer:DraftModelProposer",
    "eagle": "scheduler.speculative.eagle.proposer:EagleProposer",
}
# best: the best proposer this target has (scheduler/speculative/best.py).
SPECULATIVE_METHODS = ("off", "best", *PROPOSERS)
# Methods that borrow the target's whole embedding table and LM head (gathered under tensor parallelism).
BORROWS_VOCAB = ("draft", "eagle", "best")


def option(default, help: str, choices: tuple | None = None, unset: str | None = None, **kwargs):
    """A config field with the help text (and choices) its command-line flag shows; unset: what the
    flag's help shows as its default when that is None."""
    metadata = {"help": help, **({"choices": choices} if choices else {}), **({"unset": unset} if unset else {})}
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class EngineConfig:
    model: Any = option("default", "'default' (the SmolLM2-135M-Instruct GGUF file), a GGUF file or a Hugging "
                        "Face directory; offline, also a transformers config (random weights)")
    tokenizer: str | None = option(None, "tokenizer directory (default: the model's own)")
    device: str = option("auto", "auto (cuda when present, else cpu), cpu or cuda[:N]")
    dtype: str = option("auto", "weights and activations (auto: bfloat16 on CUDA, float32 on CPU)",
                        ("auto", *_DTYPES))
    cache_dir: str | None = option(None, "where a GGUF model's parse (config, tokenizer, de-quantised weights) is "
                                   "kept for later starts (default: $XDG_CACHE_HOME/beastserve, else "
                                   "~/.cache/beastserve); 'off' parses the GGUF file on every start")
    load_format: str = option("auto", "auto: the checkpoint's weights; dummy: random weights of the real shape",
                              ("auto", "dummy"))
    max_model_len: int | None = option(None, "most tokens of prompt plus output (default: the model's context "
                                       "length, or what the KV cache holds)")
    block_size: int = option(16, "tokens per KV-cache block")
    kv_cache_bytes: int | None = option(None, "KV cache size in bytes (default: 1 GiB on CPU, what "
                                        "--gpu-memory-utilization leaves on CUDA)")
    gpu_memory_utilization: float = option(0.9, "CUDA: share of the GPU's memory the engine may use")
    enforce_eager: bool = option(False, "CUDA: run without CUDA graphs (for debugging; the fused kernels still "
                                 "run)")
    overlap_scheduling: bool = option(True, "schedule and prepare the next step while the device runs this one, "
                                      "sampled tokens feeding it on the device (off: every step waits for its "
                                      "tokens; for debugging)")
    max_num_batched_tokens: int | None = option(None, "token budget of one engine step: 2048 on CPU, on a GPU up "
                                                "to 16384 (table in the README)", unset="chosen from the device")
    max_num_seqs: int | None = option(None, "most sequences running at once: 256 on CPU, on a GPU up to 1024 "
                                      "(table in the README)", unset="chosen from the device")
    enable_prefix_caching: bool = option(True, "reuse the KV blocks of prompt prefixes seen before")
    priority_aging_s: float = option(10.0, "every this many seconds of waiting lowers a request's priority value "
                                     "by one, so low-priority work is never starved")
    seed: int = option(0, "random seed for unseeded sampling")
    speculative: str = option("off", "speculative decoding method", SPECULATIVE_METHODS)
    draft_model: Any = option(None, "draft model for --speculative draft: what --model accepts, or a compact "
                              "draft (default: the draft shipped for the model, if one was made for it)")
    eagle_head: Any = option(None, "EAGLE head for --speculative eagle (and best): a head directory made by "
                             "distill-draft (default: the head shipped for the model, if one was made for it)")
    num_speculative_tokens: int = option(4, "most tokens drafted per sequence per step")
    adaptive_speculation: bool = option(True, "choose each step's depth from measured acceptance and cost "
                                        "(else always --num-speculative-tokens)")
    speculation_in_loop: bool = option(False, "n-gram and EAGLE drafts proposed and verified on the device inside "
                                       "the overlapped loop (else a step with drafts waits for the one before); "
                                       "n-gram's was slower on an H100 (bench/results/speculative_loop_vs_sync_h100"
                                       ".md), EAGLE's is not measured on a GPU yet")
    ngram_min: int = option(2, "n-gram proposer: shortest tail to look up")
    ngram_max: int = option(4, "n-gram proposer: longest tail to look up")
    tensor_parallel_size: int = option(1, "shard the model across this many devices (GPUs of this host; on the "
                                       "CPU, processes), one worker process per rank beyond the first")
    distributed_timeout_s: float = option(60.0, "tensor parallelism: a collective that waits this long for a rank "
                                          "fails the engine (the daemon uses at most --stall-timeout)")

    def __post_init__(self) -> None:
        # None: chosen from the device when the engine starts (scheduler/device_defaults.py).
        step_limits = [name for name in ("max_num_batched_tokens", "max_num_seqs") if getattr(self, name) is not None]
        for name in ("block_size", *step_limits, "tensor_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")
        if not self.distributed_timeout_s > 0:
            raise ValueError(f"distributed_timeout_s must be > 0, got {self.distributed_timeout_s}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.speculative not in ("off", "best") and self.speculative not in PROPOSERS:
            raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.speculative!r}")
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
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)
