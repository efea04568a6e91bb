"""The beastserve engine: paged KV cache, iteration-level scheduler, our own model forward.

Usable offline: `from scheduler import LLM, SamplingParams`. Names load on first use, so a client that
needs only SamplingParams does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "scheduler.llm",
    "CompletionOutput": "scheduler.core.outputs",
    "Engine": "scheduler.loop.engine",
    "EngineConfig": "scheduler.config",
    "RequestOutput": "scheduler.core.outputs",
    "RequestStream": "scheduler.core.outputs",
    "SamplingParams": "scheduler.core.params",
    "StructuredOutputsParams": "scheduler.core.structured",
    "TokenLogprob": "scheduler.core.outputs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'scheduler' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
