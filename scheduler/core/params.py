"""What users ask of sampling and stopping: SamplingParams, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from scheduler.core.structured import StructuredOutputsParams

MAX_LOGPROBS = 20
MAX_N = 16  # parallel samples of one prompt
MAX_LOGIT_BIAS = 100.0
# Stop strings are matched against the text after every token: their number and length bound that work. One
# limit for every protocol that reaches the engine.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 512


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _finite(name: str, value: float) -> None:
    _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
           f"{name} must be a finite number, got {value!r}")


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. Validated on construction; errors name the field."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None = up to max_model_len
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int = 0  # top-n alternatives besides the chosen token; 0 = off
    skip_special_tokens: bool = True
    n: int = 1  # completions of the prompt, sharing its KV blocks; completion i draws with seed + i
    # {token_id: bias in [-100, 100]} added to the logits before sampling (not to the logprobs reported).
    logit_bias: dict[int, float] = field(default_factory=dict)
    prompt_logprobs: int | None = None  # top-n alternatives per prompt token; None = off, 0 = the token's own only
    truncate_prompt_tokens: int | None = None  # keep the last N prompt tokens; -1 = as many as the model takes
    structured_outputs: StructuredOutputsParams | None = None  # the output must match a grammar

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        _finite("temperature", self.temperature)
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _check(_is_int(self.top_k) and self.top_k >= 0, f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        _finite("top_p", self.top_p)
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _finite("min_p", self.min_p)
        _check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        _finite("repetition_penalty", self.repetition_penalty)
        _check(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _finite(name, value)
            _check(-2 <= value <= 2, f"{name} must be in [-2, 2], got {value}")
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63),
               f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
               f"max_tokens must be >= 1, got {self.max_tokens!r}")
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens!r}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               f"min_tokens must be <= max_tokens, got {self.min_tokens} > {self.max_tokens}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop must hold non-empty strings")
        _check(len(self.stop) <= MAX_STOP_STRINGS,
               f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        _check(all(len(s) <= MAX_STOP_STRING_CHARS for s in self.stop),
               f"stop: each stop string must be at most {MAX_STOP_STRING_CHARS} characters, got one of "
               f"{max(map(len, self.stop), default=0)}")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
               f"stop_token_ids must hold integers >= 0, got {self.stop_token_ids!r}")
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N, f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        _check(_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS,
               f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        self.logit_bias = _logit_bias(self.logit_bias)
        _check(self.prompt_logprobs is None or (_is_int(self.prompt_logprobs)
                                                and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
               f"prompt_logprobs must be None or in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
        _check(self.truncate_prompt_tokens is None or (_is_int(self.truncate_prompt_tokens)
                                                       and (self.truncate_prompt_tokens >= 1
                                                            or self.truncate_prompt_tokens == -1)),
               f"truncate_prompt_tokens must be -1 or >= 1, got {self.truncate_prompt_tokens!r}")
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
               f"structured_outputs must be a StructuredOutputsParams, got {self.structured_outputs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def has_penalty(params: SamplingParams) -> bool:
    """Whether a penalty reads the request's token history (repetition, frequency, presence)."""
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


def _logit_bias(bias) -> dict[int, float]:
    _check(isinstance(bias, dict), f"logit_bias must map token ids to biases, got {type(bias).__name__}")
    for token_id, value in bias.items():
        _check(_is_int(token_id) and token_id >= 0, f"logit_bias: token id {token_id!r} must be an integer >= 0")
        _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
               and -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS,
               f"logit_bias: the bias of token {token_id} must be in [-100, 100], got {value!r}")
    return {token_id: float(value) for token_id, value in bias.items()}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
