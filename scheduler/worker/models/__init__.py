"""Model definitions and loading."""

from scheduler.worker.models.loader import (
    SUPPORTED_ARCHITECTURES,
    LoadedModel,
    ModelSource,
    build_model,
    default_model_file,
    load_config,
    load_model,
    load_tokenizer,
    resolve_model,
)

__all__ = ["SUPPORTED_ARCHITECTURES", "LoadedModel", "ModelSource", "build_model", "default_model_file",
           "load_config", "load_model", "load_tokenizer", "resolve_model"]
