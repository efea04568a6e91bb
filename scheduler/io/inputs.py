"""Turns what users send (text, token ids, chats) into validated prompt token ids."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

from scheduler.core.params import SamplingParams

Prompt = str | Sequence[int]
MIN_BYTES_PER_TOKEN = 16


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        # No token spans more bytes of text than its vocabulary entry has in UTF-8 (byte-level and SentencePiece
        # entries spell a byte in one or two), so text beyond max_model_len of the longest entry cannot fit: it is
        # refused before it is tokenised, the work that grows with it. 162 bytes for the default model (an 81-byte
        # run of spaces), so 1.3 MB at its 8,192 tokens.
        longest = max((len(t.encode()) for t in tokenizer.get_vocab()), default=0) if tokenizer is not None else 0
        self.max_prompt_bytes = max_model_len * max(longest, MIN_BYTES_PER_TOKEN)

    def check_text_size(self, text: str, field: str = "prompt") -> None:
        """Refuse text too long to fit max_model_len however it tokenises; cheap, so before tokenising."""
        if len(text) > self.max_prompt_bytes or len(text.encode("utf-8", "surrogatepass")) > self.max_prompt_bytes:
            raise ValueError(f"{field}: at most {self.max_prompt_bytes} bytes of text (max_model_len "
                             f"{self.max_model_len} tokens of at most {self.max_prompt_bytes // self.max_model_len} "
                             f"bytes each), got {len(text.encode('utf-8', 'surrogatepass'))}")

    def tokenize(self, prompt: Prompt, add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            self.check_text_size(prompt)
            return self._need_tokenizer("text prompts").encode(prompt, add_special_tokens=add_special_tokens)
        if not isinstance(prompt, Sequence) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                        for t in prompt):
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        return list(prompt)

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Apply the model's chat template, ending with the assistant's turn opened."""
        tokenizer = self._need_tokenizer("chat prompts")
        if not messages:
            raise ValueError("chat must hold at least one message")
        for i, message in enumerate(messages):
            if not isinstance(message.get("role"), str) or not message["role"]:
                raise ValueError(f"chat message {i}: role must be a non-empty string")
            if not isinstance(message.get("content"), str):
                raise ValueError(f"chat message {i}: content must be a string")
        self.check_text_size("".join(m["content"] for m in messages), "chat")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)

    def prepare(self, token_ids: list[int], params: SamplingParams) -> list[int]:
        """The prompt the engine runs: truncated as params.truncate_prompt_tokens asks, then validated.
        Preparing a prepared prompt again changes nothing."""
        token_ids = self.truncate(token_ids, params)
        self.validate(token_ids, params)
        return token_ids

    def truncate(self, token_ids: list[int], params: SamplingParams) -> list[int]:
        """The prompt as params.truncate_prompt_tokens leaves it (a copy), not validated."""
        keep = params.truncate_prompt_tokens
        if keep == -1:  # the most that leaves room for max_tokens (else for one token); at least one, so a
            keep = max(1, self.max_model_len - (params.max_tokens or 1))  # max_tokens too large is refused
        return list(token_ids) if keep is None else list(token_ids[-keep:])

    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("prompt must not be empty")
        if len(token_ids) >= self.max_model_len:  # first: the checks below read every token
            raise ValueError(f"prompt has {len(token_ids)} tokens; max_model_len is {self.max_model_len}, "
                             "which must leave room for at least one generated token")
        bad = next((t for t in token_ids if not isinstance(t, Integral) or isinstance(t, bool)), None)
        if bad is not None:
            raise ValueError(f"prompt token ids must be integers, got {bad!r}")
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        bad = next((t for t in params.stop_token_ids if t >= self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"stop_token_ids: {bad} is outside the vocabulary [0, {self.vocab_size})")
        bad = next((t for t in params.logit_bias if t >= self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"logit_bias: token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if params.max_tokens is not None and len(token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens {params.max_tokens} plus the prompt's {len(token_ids)} tokens exceeds "
                             f"max_model_len {self.max_model_len}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none (use stop_token_ids)")

    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"{what} need a tokenizer; this model has none (send token ids)")
        return self.tokenizer


def eos_token_ids(config, tokenizer) -> tuple[int, ...]:
    """Every token id that ends an answer: the model config's EOS ids and the tokenizer's."""
    ids = config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))
