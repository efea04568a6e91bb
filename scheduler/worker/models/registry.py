"""Architectures (a transformers config's `architectures[0]`) and the model class that runs each.
A new Llama-family architecture is one file implementing CausalLMModel (base.py) and a line here."""

from __future__ import annotations

from scheduler.worker.models.llama import CausalLM

MODELS = {
    "LlamaForCausalLM": CausalLM,
    "MistralForCausalLM": CausalLM,
    "Qwen2ForCausalLM": CausalLM,
    "Qwen3ForCausalLM": CausalLM,
}
# Configs without `architectures` name their family by model_type.
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}


def architecture_of(config) -> str:
    archs = getattr(config, "architectures", None) or [MODEL_TYPES.get(config.model_type, config.model_type)]
    return archs[0]


def model_class(config):
    """The class that runs this config's architecture; ValueError naming it when none does."""
    arch = architecture_of(config)
    if arch not in MODELS:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(MODELS)}")
    return MODELS[arch]
