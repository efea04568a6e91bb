"""Grammars for structured output, parsed when a request arrives and compiled off the step loop.

xgrammar is the grammar library: it is what vLLM and SGLang use by default, its token masks are fast to build
(a precomputed cache of context-independent tokens), and its matcher rolls back natively, which verifying
speculative drafts needs. Compiling builds that per-vocabulary cache, so it runs in a thread pool; a compiled
grammar is cached by (kind, text), and a request waits in the engine's queue (not in a step) until its grammar
is ready. The daemon compiles a request's grammar before it queues the request (a grammar that fails is refused
at the edge) and the engine then finds it compiled.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from scheduler.core.structured import StructuredOutputsParams

# Compact JSON: with any whitespace allowed, a small model can write newlines forever inside a valid object.
_ANY_WHITESPACE = False


def check_grammar(so: StructuredOutputsParams) -> None:
    """Parse the grammar (no vocabulary needed, so cheap): a bad schema, regex or EBNF is a ValueError naming
    the field."""
    import xgrammar as xgr

    kind, text = so.key
    try:
        if kind == "json":
            xgr.Grammar.from_json_schema(text, any_whitespace=_ANY_WHITESPACE)
        elif kind == "regex":
            xgr.Grammar.from_regex(text)
        elif kind in ("grammar", "choice"):
            xgr.Grammar.from_ebnf(_ebnf(kind, text))
        elif kind == "structural_tag":
            xgr.Grammar.from_structural_tag(_structural_tag(text))
    except (RuntimeError, ValueError, RecursionError) as exc:
        raise ValueError(f"structured_outputs.{kind}: {library_message(exc)}") from None


def grammar_error(so: StructuredOutputsParams, exc: BaseException) -> ValueError:
    """A failed compile as the ValueError naming the field."""
    return ValueError(f"structured_outputs.{so.kind}: {library_message(exc)}")


class UnsatisfiableGrammar(ValueError):
    """No string matches the grammar: it allows no first token (nor an end)."""


class GrammarCompiler:
    """Compiles grammars for one tokenizer and vocabulary in background threads; cached by (kind, text).
    Thread-safe. The tokenizer's tables are built on the first compile, so an engine that never sees a
    structured request never pays for them."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...], max_workers: int = 1,
                 max_cached: int = 256):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        # The pool bounds the compiles at once: many structured requests wait for each other, never for the
        # step loop or the server's event loop.
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="grammar")
        self._compiler = None
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()  # least recently used first
        self.max_cached = max_cached
        self._lock = threading.Lock()

    def check(self, so: StructuredOutputsParams) -> None:
        """A bad grammar as a ValueError naming the field, now: one that failed to compile already, or one not
        compiled yet that does not parse (which is cheap)."""
        with self._lock:
            done = self._cache.get(so.key)
        if done is None or not done.done() or done.cancelled():
            check_grammar(so)
        elif done.exception() is not None:
            raise grammar_error(so, done.exception())

    def submit(self, so: StructuredOutputsParams) -> Future:
        """A future of the xgrammar CompiledGrammar; one compile per distinct grammar (while it stays among the
        max_cached used last)."""
        key = so.key
        with self._lock:
            future = self._cache.get(key)
            if future is None or future.cancelled() or (future.done() and future.exception() is not None):
                future = self._cache[key] = self._pool.submit(self._compile, *key)
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
            return future

    def shutdown(self) -> None:
        """Stop the pool's threads: queued compiles are cancelled, one under way is waited for (the size and
        nesting bounds keep it to seconds)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _compile(self, kind: str, text: str):
        import xgrammar as xgr

        if self._compiler is None:  # only this pool's threads get here; one of them builds it
            with self._lock:
                if self._compiler is None:
                    info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                              stop_token_ids=self.stop_token_ids)
                    self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        if kind == "json":
            compiled = self._compiler.compile_json_schema(text, any_whitespace=_ANY_WHITESPACE)
        elif kind == "json_object":
            compiled = self._compiler.compile_builtin_json_grammar()
        elif kind == "regex":
            compiled = self._compiler.compile_regex(text)
        elif kind == "structural_tag":
            compiled = self._compiler.compile_structural_tag(_structural_tag(text))
        else:
            compiled = self._compiler.compile_grammar(_ebnf(kind, text))
        _check_satisfiable(compiled)
        return compiled


def _check_satisfiable(compiled) -> None:
    """A grammar that allows no first token, and does not accept the empty string (which allows a stop token),
    matches nothing (`root ::= x`, `x ::= x "a"`): served, it would end at once with no output."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)
    xgr.GrammarMatcher(compiled).fill_next_token_bitmask(bitmask)
    if not bitmask.any():
        raise UnsatisfiableGrammar("no string satisfies it: it allows no first token")


def _ebnf(kind: str, text: str) -> str:
    if kind == "grammar":
        return text
    # One string literal per choice; JSON's escapes are EBNF's.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(text))


def _structural_tag(text: str):
    """What xgrammar takes for a structural tag's JSON text: the text itself in the current form; the older form
    ({"structures": [{"begin", "schema", "end"}], "triggers": [...]}, what OpenAI-style tool calling sends)
    converted, as xgrammar's deprecated two-argument call would."""
    import xgrammar as xgr

    spec = json.loads(text)
    if "structures" not in spec:
        return text
    structures, triggers = spec["structures"], spec.get("triggers")
    if not isinstance(structures, list) or not all(isinstance(s, dict) for s in structures):
        raise ValueError("structures: must be a list of {begin, schema, end} objects")
    if not (isinstance(triggers, list) and triggers and all(isinstance(t, str) and t for t in triggers)):
        raise ValueError("triggers: must be a list of non-empty strings (the begins' prefixes that start a tag)")
    missing = next((f"structures[{i}].{key}" for i, s in enumerate(structures) for key in ("begin", "schema", "end")
                    if key not in s), None)
    if missing is not None:
        raise ValueError(f"{missing}: required")
    items = [xgr.StructuralTagItem(begin=s["begin"], schema=s["schema"], end=s["end"]) for s in structures]
    return xgr.StructuralTag.from_legacy_structural_tag(items, triggers)


def library_message(exc: Exception) -> str:
    # xgrammar's messages start with "[time] /path/file.cc:line: "; keep what follows.
    message = str(exc).strip()
    if message.startswith("[") and ": " in message:
        message = message.split(": ", 1)[1] if ".cc:" in message.split(": ", 1)[0] else message
    return message
