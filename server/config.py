"""Daemon settings: the engine's own configuration plus the server's, as `serve`'s flags.

Every flag is made from a dataclass field (EngineConfig's, then ServerConfig's), with the field's
help text and default, and every flag also reads BEASTSERVE_<FLAG> from the environment: the flags,
the environment and the engine can never disagree on a name or a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.config import EngineConfig, option

# Names other serving stacks' deployments already set.
ENV_ALIASES = {"speculative": ("ENABLE_SPECULATIVE",), "draft_model": ("DRAFT_MODEL_PATH",)}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class Port(int):
    """A port number; 0 or "off" for none (a flag's value, or its BEASTSERVE_* variable)."""

    def __new__(cls, value=0):
        if isinstance(value, str) and value.strip().lower() == "off":
            value = 0
        return super().__new__(cls, int(value))


@dataclass
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    served_model_name: str | None = option(None, "the model's name in logs, GetModelInfo and the metrics' "
                                           "model_name label (default: the model's own, e.g. SmolLM2-135M-Instruct)")
    host: str = option("0.0.0.0", "address to listen on, for gRPC and /metrics")
    port: int = option(50051, "gRPC port")
    metrics_port: int = option(9400, "Prometheus /metrics HTTP port, on --host (0 = off)")
    http_port: Port = option(Port(8000), "OpenAI-compatible HTTP API port (/v1/completions, /v1/chat/completions, "
                             "...), on --host with gRPC's API keys and TLS (0 or off = off)")
    max_queue_size: int = option(1024, "requests waiting beyond this get RESOURCE_EXHAUSTED")
    drain_timeout: float = option(30.0, "seconds in-flight requests get to finish after SIGTERM")
    stream_write_timeout: float = option(20.0, "seconds a streamed call's client may leave a message unread; then the "
                                         "call ends DEADLINE_EXCEEDED and its request is aborted, its KV blocks freed")
    stream_interval: int = option(1, "output tokens a streamed message gathers before it is sent (the first token "
                                  "and the end go at once): more means fewer, fuller messages and a burstier stream, "
                                  "for a front end that cannot keep up with one message a token (vLLM's "
                                  "--stream-interval)")
    stall_timeout: float = option(60.0, "readiness fails when the engine makes no progress this long with work "
                                  "pending")
    max_message_bytes: int = option(16 << 20, "largest gRPC message accepted or sent")
    api_key_file: str | None = option(None, "file with one accepted API key per line (authorization: Bearer "
                                      "<key>)")
    tls_cert_file: str | None = option(None, "server certificate (PEM), with --tls-key-file")
    tls_key_file: str | None = option(None, "server private key (PEM), with --tls-cert-file")
    tls_client_ca_file: str | None = option(None, "CA that client certificates must chain to (mutual TLS)")
    log_requests: bool = option(False, "log prompts and outputs (off by default: they may be private)")
    engine_core: str = option("thread", "where the engine's step loop runs: a thread of the daemon's process, "
                              "taking turns with the gRPC front end on one interpreter lock, or a process of its "
                              "own (vLLM's EngineCore), the front end then running beside it on another core",
                              ("thread", "process"))


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MAX_STREAM_INTERVAL = 1024


def served_name(config: ServerConfig) -> str:
    """The one name the daemon gives its model: --served-model-name, else the model's own (the default
    model's, or its file or directory name)."""
    if config.served_model_name:
        return config.served_model_name
    model = config.engine.model
    if model == "default":
        return DEFAULT_MODEL_NAME
    from scheduler.worker.models.hub import is_repo_id

    if is_repo_id(str(model)):
        return str(model)  # as vLLM names it: the id clients already know
    path = Path(str(model)).expanduser()
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def _options(classes=(EngineConfig, ServerConfig)) -> list[tuple[dataclasses.Field, type]]:
    """(field, value type) of every flag: the engine's fields, then the server's own."""
    out = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name != "engine":
                out.append((f, _value_type(hints[f.name])))
    return out


def flag_names() -> list[str]:
    """Every serve option's field name (BEASTSERVE_<NAME> sets it)."""
    return [f.name for f, _ in _options()]


def _value_type(hint) -> type:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return str if hint is typing.Any else hint


def add_server_args(parser: argparse.ArgumentParser, env=os.environ) -> None:
    """One flag per option; a flag's default comes from BEASTSERVE_<FLAG> when set."""
    _add_args(parser, _options(), env)


def add_engine_args(parser: argparse.ArgumentParser, env=os.environ) -> None:
    """The engine's options only (for commands that run the engine without a server)."""
    _add_args(parser, _options((EngineConfig,)), env)


def _add_args(parser: argparse.ArgumentParser, options, env) -> None:
    for f, kind in options:
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        raw = _env_value(f.name, env)
        value = default if raw is None else _parse_env(f.name, raw, kind)
        shown = f.metadata["unset"] if value is None and "unset" in f.metadata else "%(default)s"
        help_text = f"{f.metadata.get('help', '')} [{_env_names(f.name)}; default: {shown}]"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=value, choices=f.metadata.get("choices"),
                                help=help_text)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The parsed engine flags as a validated EngineConfig; ValueError names the flag at fault."""
    names = [f.name for f in dataclasses.fields(EngineConfig)]
    try:
        return EngineConfig(**{name: getattr(args, name) for name in names})
    except ValueError as exc:
        name, _, rest = str(exc).partition(" ")
        raise ValueError(f"--{name.replace('_', '-')} {rest}" if name in names else str(exc)) from None


def check_available(engine: EngineConfig) -> None:
    """What the engine will need, checked before a port is bound or a byte loaded: the model (and a
    draft model given as a path) can be found, and the device exists. ValueError names the flag."""
    import torch

    from scheduler.worker.models import hub, resolve_model

    for flag, model in (("--model", engine.model), ("--draft-model", engine.draft_model)):
        if model is None or (flag == "--draft-model" and engine.speculative != "draft"):
            continue
        try:
            if hub.is_repo_id(model):
                hub.check_repo_id(model)  # downloaded, if need be, while loading
                continue
            if model != "default" and not Path(model).expanduser().exists():
                raise FileNotFoundError(f"{model}: no such file or directory")
            if flag == "--model" or not (Path(model) / "draft.json").is_file():  # a compact draft has no weights
                resolve_model(model)
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"{flag} {exc}" if str(exc).startswith(model) else f"{flag}: {exc}") from None
    head = engine.eagle_head
    if head is not None and engine.speculative in ("eagle", "best") and \
            not (Path(head).expanduser() / "head.json").is_file():
        raise ValueError(f"--eagle-head {head}: no head.json there (an EAGLE head directory, made by distill-draft)")
    device = str(engine.device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                             f"{torch.cuda.device_count()} GPUs); use --device cpu or auto")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} GPUs")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The parsed flags as a validated ServerConfig; ValueError names the flag at fault."""
    engine = engine_config_from_args(args)
    config = ServerConfig(engine, **{f.name: getattr(args, f.name) for f, _ in _options((ServerConfig,))})
    if bool(config.tls_cert_file) != bool(config.tls_key_file):
        raise ValueError("--tls-cert-file and --tls-key-file go together")
    if config.tls_client_ca_file and not config.tls_cert_file:
        raise ValueError("--tls-client-ca-file needs --tls-cert-file and --tls-key-file")
    for flag, port, lowest in (("--port", config.port, 1), ("--metrics-port", config.metrics_port, 0),
                               ("--http-port", config.http_port, 0)):
        if not lowest <= port <= 65535:
            raise ValueError(f"{flag} must be in [{lowest}, 65535], got {port}")
    if not config.stream_write_timeout > 0:
        raise ValueError(f"--stream-write-timeout must be > 0, got {config.stream_write_timeout}")
    if not 1 <= config.stream_interval <= MAX_STREAM_INTERVAL:
        raise ValueError(f"--stream-interval must be in [1, {MAX_STREAM_INTERVAL}], got {config.stream_interval}")
    if config.max_queue_size < 1:
        raise ValueError(f"--max-queue-size must be >= 1, got {config.max_queue_size}")
    if config.engine_core == "process" and config.engine.tensor_parallel_size > 1:
        raise ValueError("--engine-core process does not serve tensor parallelism yet (--tensor-parallel-size "
                         f"{config.engine.tensor_parallel_size}); use --engine-core thread")
    return config


def _env_names(name: str) -> str:
    return ", ".join(("BEASTSERVE_" + name.upper(), *ENV_ALIASES.get(name, ())))


def _env_value(name: str, env) -> str | None:
    for key in ("BEASTSERVE_" + name.upper(), *ENV_ALIASES.get(name, ())):
        if env.get(key):
            return env[key]
    return None


def _parse_env(name: str, raw: str, kind):
    if kind is bool:
        if raw.lower() not in _TRUE + _FALSE:
            raise ValueError(f"BEASTSERVE_{name.upper()}={raw!r} is not a boolean (true or false)")
        return raw.lower() in _TRUE
    if name == "speculative" and raw.lower() in _TRUE:
        return "draft"  # ENABLE_SPECULATIVE=true
    if name == "speculative" and raw.lower() in _FALSE:
        return "off"
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"BEASTSERVE_{name.upper()}={raw!r} is not a valid {kind.__name__}") from None
