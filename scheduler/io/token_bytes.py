"""The bytes each token stands for, so the detokenizer can tell a character cut in its middle from U+FFFD
itself: `tokenizer.decode` renders both as U+FFFD."""

from __future__ import annotations

import codecs
import logging
import threading
from collections.abc import Sequence

logger = logging.getLogger(__name__)


class TokenBytes:
    """Each token's bytes, as xgrammar reads them from a Hugging Face tokenizer (byte-level, byte-fallback and
    plain vocabularies alike). Read on first use (~0.3 s for a 49k vocabulary), or with `prefetch` in a
    background thread from the start, so that no engine step waits for it."""

    def __init__(self, tokenizer, prefetch: bool = False):
        self._tokenizer = tokenizer
        self._table: list[bytes] | None = None
        self._read = False
        self._lock = threading.Lock()
        # What decode(skip_special_tokens=True) leaves out: the added tokens marked special.
        decoder = getattr(tokenizer, "added_tokens_decoder", {})
        self.special_ids = frozenset(i for i, token in decoder.items() if token.special)
        if prefetch:
            # Not a daemon thread: a process exiting while it runs inside xgrammar's C++ aborts ("terminate called
            # without an active exception", exit -6); exit waits for the read instead.
            threading.Thread(target=self._get_table, name="token-bytes").start()

    def of(self, token_ids: Sequence[int], skip_special_tokens: bool) -> list[bytes] | None:
        """Each token's bytes as decode() sees them (b"" for a skipped special token); None when unknown."""
        table = self._get_table()
        if table is None:
            return None
        skipped = self.special_ids if skip_special_tokens else ()
        return [table[t] if t < len(table) and t not in skipped else b"" for t in token_ids]

    def _get_table(self) -> list[bytes] | None:
        with self._lock:
            if not self._read:
                self._read = True
                try:
                    import xgrammar as xgr

                    info = xgr.TokenizerInfo.from_huggingface(self._tokenizer)
                    self._table = [bytes(b) for b in info.decoded_vocab]
                except Exception as exc:  # a tokenizer xgrammar cannot read: decode's own text, U+FFFD and all
                    logger.warning("cannot read the tokenizer's bytes (%s): an answer cut inside a character "
                                   "will end in U+FFFD", exc)
            return self._table


def incomplete_utf8_suffix(data: bytes) -> int:
    """How many bytes at the end of data begin a UTF-8 character without finishing it (0 to 3). Such a
    beginning lies within the last 3 bytes, and what comes before it cannot change that."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(data[-3:])
    return len(decoder.getstate()[0])
