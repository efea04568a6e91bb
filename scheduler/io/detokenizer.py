"""Incremental detokenization and stop-string detection for one request."""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerFast

from scheduler.core.params import SamplingParams
from scheduler.core.stopping import may_stop
from scheduler.io.token_bytes import TokenBytes, incomplete_utf8_suffix

# Tokenizers that drop a token's leading space when it starts the decoded text (SentencePiece,
# some BPEs) need a few tokens of context before the first output token.
PROMPT_CONTEXT_TOKENS = 5

# A UTF-8 character needs at most 4 bytes, so pending tokens that still end mid-character after
# this many are invalid bytes (or special tokens skipped in the middle of a character), not a split
# character; emit them rather than grow the window forever.
MAX_PENDING_TOKENS = 16

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a request's output tokens into text step by step and watches for stop strings.

    Each step decodes only a short window of recent tokens (prefix_offset/read_offset technique),
    so the cost per token does not grow with the output length. The text is always what
    tokenizer.decode gives; a fast tokenizer's Rust backend is called directly when that is the same.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams,
                 token_bytes: TokenBytes | None = None):
        self._decode = _decoder(tokenizer, params.skip_special_tokens)
        self._cut_sensitive = _cut_sensitive(tokenizer)
        # Without token_bytes, a trailing U+FFFD cannot be told from a cut character: text ends as decode's does.
        self._token_bytes = token_bytes
        self._stop = list(params.stop)
        self._include_stop_str_in_output = params.include_stop_str_in_output
        self._params = params
        # Any suffix this long could still grow into a stop string, so it is not streamed yet.
        self._holdback_chars = max((len(s) for s in self._stop), default=1) - 1

        # The window is token_ids[0:]; token_ids[:read_offset] are already turned into text and
        # serve as context, the rest are pending. Older tokens are dropped as the window slides.
        self._token_ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._read_offset = len(self._token_ids)
        self._context_text: str | None = None  # decode(token_ids[:read_offset]), once needed

        self._text = ""
        self.held_back_bytes = 0  # when finished: bytes of the last tokens that began a character never finished
        self._num_sent_chars = 0
        self._num_output_tokens = 0
        self._stop_string: str | None = None

    @property
    def output_text(self) -> str:
        """All output text so far, truncated at the stop string if one matched."""
        return self._text

    def add_tokens(self, new_token_ids: list[int], num_output_tokens: int) -> str | None:
        """Decode newly generated tokens; num_output_tokens is the output length after adding them.

        Returns the stop string that completed, else None. The text is then truncated before it
        (after it with include_stop_str_in_output) and any later tokens of this call are ignored.
        With stop strings, tokens are processed one at a time, so the result never depends on how they
        are batched into calls: a stop string counts only once the output reaches min_tokens at the token
        that completes it, and of several stop strings completing on one token, the one that ends first
        in the text wins (ties: the longer one). Without, the new tokens are decoded together, in one
        window decode where they end on a whole character: the same text, whatever the batching, for the
        cost of one token (a reader taking several tokens at once pays one decode a read).
        """
        assert self._stop_string is None, "add_tokens called after a stop string matched"
        if not self._stop and len(new_token_ids) > 1:  # no stop string to match: one decode for all of them
            self._num_output_tokens = num_output_tokens
            new_token_ids = list(new_token_ids)
            while new_token_ids and self._context_unfinished(new_token_ids[0]):
                self._append_text(self._append_one(new_token_ids.pop(0)))
            self._token_ids += new_token_ids
            self._append_text(self._decode_read() if new_token_ids else "")
            return None
        num_before = num_output_tokens - len(new_token_ids)
        for i, token_id in enumerate(new_token_ids):
            self._num_output_tokens = num_before + i + 1
            self._token_ids.append(token_id)
            stop = self._append_text(self._decode_pending(force=False))
            if stop is not None:
                return stop
        return None

    def take_delta(self, finished: bool) -> str:
        """Return the output text not handed out yet.

        While not finished, a trailing incomplete UTF-8 character and the last len(longest stop)-1
        characters are held back. When finished, everything left is handed out but the bytes of a
        character the output began and never finished (`held_back_bytes` counts them; the token ids
        still carry them). Invalid bytes, and U+FFFD itself, read as U+FFFD, as tokenizer.decode has them.
        """
        if finished and self._stop_string is None and self._read_offset < len(self._token_ids):
            self._append_text(self._decode_pending(force=True))
        end = len(self._text)
        if not finished:
            end = max(self._num_sent_chars, end - self._holdback_chars)
        delta = self._text[self._num_sent_chars:end]
        self._num_sent_chars = end
        return delta

    def _decode_pending(self, force: bool) -> str:
        # "" while the pending tokens end inside a multi-byte character; forced (finished), the text
        # without that character's bytes.
        num_pending = len(self._token_ids) - self._read_offset
        if num_pending == 0:
            return ""
        # Decoding with context and subtracting the context's text keeps spaces and merged bytes
        # that a token decoded on its own would lose. The context's text is decoded once per slide
        # of the window, not again while tokens wait for the rest of a character.
        # (tokenizers' DecodeStream does the same in one call, but cannot flush pending tokens
        # early or at the end, and keeps a different context after a token that decodes to "".)
        if self._context_text is None:
            self._context_text = self._decode(self._token_ids[:self._read_offset])
        end, window_text = len(self._token_ids), self._decode(self._token_ids)
        if window_text.endswith(REPLACEMENT_CHAR) and (force or num_pending < MAX_PENDING_TOKENS):
            whole = self._whole_characters(window_text, force)
            if whole is None:
                return ""
            end, window_text = whole
        new_text = window_text[len(self._context_text):]
        self._slide(end)
        return new_text

    def _decode_read(self) -> str:
        # Several pending tokens at once, no stop string to watch: ONE window decode when it ends on a whole
        # character (as most reads do); where a character begun at the end is not finished, the tokens before it
        # go out (a second decode) and it waits, as token by token. Where the text could differ from token by
        # token's, the tokens go one at a time: no token bytes to tell a cut character by, one of 16 tokens or
        # more, or U+FFFD in the window where the decoder's U+FFFDs depend on where the window is cut.
        if self._context_text is None:
            self._context_text = self._decode(self._token_ids[:self._read_offset])
        window_text = self._decode(self._token_ids)
        end = len(self._token_ids)
        pending = self._token_ids[self._read_offset:]
        if window_text.endswith(REPLACEMENT_CHAR):
            token_bytes = self._token_bytes.of(pending, self._params.skip_special_tokens) \
                if self._token_bytes else None
            first = _unfinished_start(token_bytes) if token_bytes is not None else None
            if first is None or len(pending) - first >= MAX_PENDING_TOKENS:
                return self._one_at_a_time(pending)
            if first == 0:
                return ""  # all of them wait for the rest of the character
            if first < len(pending):
                end = self._read_offset + first
                window_text = self._decode(self._token_ids[:end])
        if self._cut_sensitive and REPLACEMENT_CHAR in window_text:
            return self._one_at_a_time(pending)
        new_text = window_text[len(self._context_text):]
        self._slide(end)
        return new_text

    def _one_at_a_time(self, pending: list[int]) -> str:
        del self._token_ids[self._read_offset:]
        return "".join([self._append_one(token_id) for token_id in pending])

    def _context_unfinished(self, next_token_id: int) -> bool:
        # Does the window's context (the prompt's last tokens, or tokens forced out) end inside a character that
        # the next token may finish? Then what text the tokens add depends on where the window is cut: they go one
        # at a time, as token by token, until it does not.
        if self._context_text is None:
            self._context_text = self._decode(self._token_ids[:self._read_offset])
        if not self._context_text.endswith(REPLACEMENT_CHAR):
            return False
        if self._token_bytes is None:
            return True
        context = self._token_ids[:self._read_offset] + [next_token_id]
        token_bytes = self._token_bytes.of(context, self._params.skip_special_tokens)
        if token_bytes is None:
            return True
        *context_bytes, next_bytes = token_bytes
        return incomplete_utf8_suffix(b"".join(context_bytes)) > 0 and (not next_bytes or 0x80 <= next_bytes[0] < 0xC0)

    def _append_one(self, token_id: int) -> str:
        self._token_ids.append(token_id)
        return self._decode_pending(force=False)

    def _slide(self, end: int) -> None:
        # The tokens before `end` have become text: those since the read offset are the next window's context.
        del self._token_ids[:self._read_offset]
        self._read_offset = end - self._read_offset
        self._context_text = None

    def _whole_characters(self, window_text: str, force: bool) -> tuple[int, str] | None:
        """(tokens consumed, the text of the window's whole characters) when the window's text ends in U+FFFD:
        all of it when that is U+FFFD itself or invalid bytes; else, while not forced, the tokens before the
        character begun and not finished, which waits in the window for the rest; forced, every token, the
        text without that character. None: nothing to hand out yet."""
        num_tokens = len(self._token_ids)
        pending = self._token_ids[self._read_offset:]
        token_bytes = self._token_bytes.of(pending, self._params.skip_special_tokens) if self._token_bytes else None
        if token_bytes is None:
            return (num_tokens, window_text) if force else None
        num_tail = incomplete_utf8_suffix(b"".join(token_bytes))
        if num_tail == 0:
            return num_tokens, window_text
        # The first pending token the unfinished character reaches into (one begun before them is not held back).
        first, num_bytes = len(token_bytes), 0
        while first > 0 and num_bytes < num_tail:
            first -= 1
            num_bytes += len(token_bytes[first])
        end = self._read_offset + first
        if num_bytes <= num_tail:  # the character's bytes are whole tokens
            if not force:
                return (end, self._decode(self._token_ids[:end])) if first else None
            self.held_back_bytes = num_bytes
            return num_tokens, self._decode(self._token_ids[:end]) if first else self._context_text
        if not force:  # that token holds whole characters too: they go out with the rest of the character
            return None
        # Only a byte-level vocabulary has such tokens; its decode ends an unfinished character in one U+FFFD.
        self.held_back_bytes = num_tail
        return num_tokens, self._decode(self._token_ids[:end + 1]).removesuffix(REPLACEMENT_CHAR)

    def _append_text(self, new_text: str) -> str | None:
        if not new_text:
            return None
        old_len = len(self._text)
        self._text += new_text
        if not self._stop or not may_stop(self._params, self._num_output_tokens):
            return None
        match = self._find_new_stop(old_len)
        if match is None:
            return None
        start, stop = match
        self._stop_string = stop
        self._text = self._text[:start + len(stop) if self._include_stop_str_in_output else start]
        assert self._num_sent_chars <= len(self._text), "streamed text was cut by a stop string"
        return stop

    def _find_new_stop(self, old_len: int) -> tuple[int, str] | None:
        # (start, stop) of the earliest-ending match that ends past old_len; ties go to the longer stop.
        best: tuple[int, int, str] | None = None
        for stop in self._stop:
            # A match ending inside the old text was either found already or ignored (min_tokens).
            start = self._text.find(stop, max(0, old_len - len(stop) + 1))
            if start == -1:
                continue
            candidate = (start + len(stop), start, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        return None if best is None else (best[1], best[2])


def _unfinished_start(token_bytes: list[bytes]) -> int | None:
    """The first of these tokens that a character begun at their end and not finished reaches into, where every
    byte before that token ends a character (len(token_bytes) when none is begun); None where no token boundary
    lies between the last whole character and the one begun (a token ends one character and begins the next)."""
    num_tail = incomplete_utf8_suffix(b"".join(token_bytes))
    first, num_bytes = len(token_bytes), 0
    while first > 0 and num_bytes < num_tail:
        first -= 1
        num_bytes += len(token_bytes[first])
    if num_bytes <= num_tail:  # the character's bytes are whole tokens
        return first
    return first if incomplete_utf8_suffix(b"".join(token_bytes[:first])) == 0 else None


def _cut_sensitive(tokenizer) -> bool:
    # Can the U+FFFDs that decode makes of invalid bytes depend on where the window is cut? Not with a byte-level
    # decoder (lossy UTF-8 over all the bytes: a cut between characters changes nothing), nor where no bytes are
    # decoded; with byte fallback yes (a run of byte tokens is all U+FFFDs when any of it is invalid), and where
    # the decoder is not known (a decode of the class's own, or a slow tokenizer).
    if not (isinstance(tokenizer, PreTrainedTokenizerFast) and _inherits(tokenizer, "decode")
            and _inherits(tokenizer, "_decode")):
        return True
    return "ByteFallback" in repr(tokenizer.backend_tokenizer.decoder)


def _decoder(tokenizer, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    # Returns token_ids -> tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens).
    # transformers' decode of a fast tokenizer is its Rust backend's decode plus, per call, some
    # microseconds of Python (argument conversion, optional space clean-up). That wrapper is skipped
    # only where the class adds nothing to it: no override of decode, no clean-up.
    if (isinstance(tokenizer, PreTrainedTokenizerFast) and _inherits(tokenizer, "decode")
            and _inherits(tokenizer, "_decode") and not tokenizer.clean_up_tokenization_spaces):
        backend_decode = tokenizer.backend_tokenizer.decode
        # Positional: the Rust binding parses a keyword argument noticeably slower.
        return lambda token_ids: backend_decode(token_ids, skip_special_tokens)
    return lambda token_ids: tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def _inherits(tokenizer, method: str) -> bool:
    # Is tokenizer.<method> PreTrainedTokenizerFast's, overridden neither by a subclass nor on the instance?
    return getattr(getattr(tokenizer, method), "__func__", None) is getattr(PreTrainedTokenizerFast, method)
