"""Daemon settings: command-line flags, each also read from BEASTSERVE_<FLAG> in the environment."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

SPECULATIVE_MODES = ("off", "draft", "ngram")
# Names other serving stacks' deployments already set.
ENV_ALIASES = {"speculative": ("ENABLE_SPECULATIVE",), "draft_model": ("DRAFT_MODEL_PATH",)}


@dataclass
class ServerConfig:
    model: str = "default"
    draft_model: str | None = None
    speculative: str = "off"
    num_speculative_tokens: int = 4
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 9400
    device: str = "auto"
    dtype: str = "auto"
    load_format: str = "auto"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    max_queue_size: int = 1024
    drain_timeout: float = 30.0
    stall_timeout: float = 60.0
    max_message_bytes: int = 16 << 20
    api_key_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    log_requests: bool = False

    def engine_kwargs(self) -> dict:
        names = ("device", "dtype", "load_format", "max_model_len", "block_size", "kv_cache_bytes",
                 "gpu_memory_utilization", "max_num_batched_tokens", "max_num_seqs", "speculative", "draft_model",
                 "num_speculative_tokens", "enforce_eager")
        return {name: getattr(self, name) for name in names}


_HELP = {
    "model": "'default', a GGUF file or a Hugging Face directory",
    "draft_model": "draft model for --speculative draft (also DRAFT_MODEL_PATH); default: the draft shipped for "
                   "the model, if one was made for it",
    "speculative": "speculative decoding mode (also ENABLE_SPECULATIVE)",
    "num_speculative_tokens": "most tokens drafted per step",
    "port": "gRPC port",
    "metrics_port": "Prometheus /metrics HTTP port (0 = off)",
    "kv_cache_bytes": "KV cache size in bytes (default: 1 GiB on CPU, --gpu-memory-utilization on CUDA)",
    "enforce_eager": "CUDA: run without CUDA graphs (for debugging; the fused kernels still run)",
    "max_queue_size": "requests waiting beyond this get RESOURCE_EXHAUSTED",
    "drain_timeout": "seconds in-flight requests get to finish after SIGTERM",
    "stall_timeout": "readiness fails when the engine makes no progress this long with work pending",
    "max_message_bytes": "largest gRPC message accepted or sent",
    "api_key_file": "file with one accepted API key per line (authorization: Bearer <key>)",
    "tls_client_ca_file": "CA that client certificates must chain to (mutual TLS)",
    "log_requests": "log prompts and outputs (off by default: they may be private)",
}


def add_server_args(parser: argparse.ArgumentParser, env=os.environ) -> None:
    """One flag per ServerConfig field; a flag's default comes from BEASTSERVE_<FLAG> when set."""
    defaults = ServerConfig()
    for name, default in vars(defaults).items():
        flag = "--" + name.replace("_", "-")
        env_value = _env_value(name, env)
        kind = type(default) if default is not None else (int if name == "kv_cache_bytes" or name == "max_model_len"
                                                            else str)
        help_text = _HELP.get(name, "")
        if kind is bool:
            value = default if env_value is None else env_value.lower() in ("1", "true", "yes", "on")
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=help_text)
            continue
        choices = SPECULATIVE_MODES if name == "speculative" else None
        value = default if env_value is None else _parse_env(name, env_value, kind)
        parser.add_argument(flag, type=kind, default=value, choices=choices, help=help_text)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    values = {name: getattr(args, name) for name in vars(ServerConfig())}
    config = ServerConfig(**values)
    if bool(config.tls_cert_file) != bool(config.tls_key_file):
        raise ValueError("--tls-cert-file and --tls-key-file go together")
    if config.tls_client_ca_file and not config.tls_cert_file:
        raise ValueError("--tls-client-ca-file needs --tls-cert-file and --tls-key-file")
    if config.max_queue_size < 1:
        raise ValueError(f"--max-queue-size must be >= 1, got {config.max_queue_size}")
    return config


def _env_value(name: str, env) -> str | None:
    for key in ("BEASTSERVE_" + name.upper(), *ENV_ALIASES.get(name, ())):
        if env.get(key):
            return env[key]
    return None


def _parse_env(name: str, raw: str, kind):
    if name == "speculative" and raw.lower() in ("1", "true", "yes", "on"):
        return "draft"  # ENABLE_SPECULATIVE=true
    if name == "speculative" and raw.lower() in ("0", "false", "no"):
        return "off"
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"BEASTSERVE_{name.upper()}={raw!r} is not a valid {kind.__name__}") from None
