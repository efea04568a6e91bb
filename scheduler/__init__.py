"""The beastserve engine: paged KV cache, iteration-level scheduler, our own model forward.

Usable offline: `from scheduler import LLM, SamplingParams`.
"""

from scheduler.config import EngineConfig
from scheduler.core.engine import Engine
from scheduler.io.outputs import CompletionOutput, RequestOutput, RequestStream, TokenLogprob
from scheduler.llm import LLM
from scheduler.sampling.params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "Engine", "EngineConfig", "RequestOutput", "RequestStream", "SamplingParams",
           "TokenLogprob"]
