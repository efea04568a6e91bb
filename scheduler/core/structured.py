"""What a request's output must match: a JSON schema, any JSON object, a regex, one of several strings, an
EBNF grammar, or a structural tag (text with tagged, constrained parts: tool calls). Checked here for form only
(no grammar library is imported, so clients stay light); the engine parses the grammar itself when the request
arrives (scheduler/structured/compiler.py)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

MAX_CHOICES = 1024
KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
# Cheap bounds checked before any parsing. Compile time grows steeply with both (xgrammar 0.2.9, default model's
# vocabulary, 2 cores: a schema of 1,000 properties (56 KB) takes 1.7 s, 2,000 (114 KB) 13 s; 63 nested objects
# (JSON depth 127) 0.03 s, 100 (depth 201) 0.1 s, 400 tens of seconds), and Python's JSON parser raises
# RecursionError past ~1,000 levels.
MAX_GRAMMAR_BYTES = 64 << 10
MAX_NESTING = 128  # JSON arrays/objects, or the groups of a regex or grammar, within one another


@dataclass
class StructuredOutputsParams:
    """Exactly one of the fields. `json` is a schema, as a dict or its JSON text. `structural_tag` is xgrammar's
    structural tag as a dict or its JSON text: {"type": "structural_tag", "format": {...}}, or the older form
    OpenAI-style APIs send, {"structures": [{"begin", "schema", "end"}, ...], "triggers": [...]}. Errors name the
    field as `structured_outputs.<field>`."""

    json: Any = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: Any = None

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs: give exactly one of {', '.join(KINDS)}, got "
                             f"{', '.join(given) if given else 'none'}")
        for name in ("json", "structural_tag", "regex", "grammar"):
            if isinstance(getattr(self, name), str):
                check_size_and_nesting(name, getattr(self, name))
        if self.json is not None:
            self.json = _json_text(self.json, "json", (dict, bool), "a schema is a JSON object")
        if self.structural_tag is not None:
            self.structural_tag = _json_text(self.structural_tag, "structural_tag", dict,
                                             "a structural tag is a JSON object")
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object: must be a bool, got {self.json_object!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise ValueError(f"structured_outputs.{name}: must be a non-empty string, got {value!r}")
        if self.choice is not None:
            self.choice = list(self.choice)
            if not self.choice or len(self.choice) > MAX_CHOICES:
                raise ValueError(f"structured_outputs.choice: must hold 1 to {MAX_CHOICES} strings, "
                                 f"got {len(self.choice)}")
            if not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("structured_outputs.choice: must hold non-empty strings")
            size = sum(len(c.encode()) for c in self.choice)
            if size > MAX_GRAMMAR_BYTES:
                raise ValueError(f"structured_outputs.choice: at most {MAX_GRAMMAR_BYTES} bytes in all, got {size}")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """What the compiled grammar is cached by: (kind, text)."""
        kind = self.kind
        if kind == "json_object":
            return kind, ""
        if kind == "choice":
            return kind, json.dumps(self.choice)
        return kind, getattr(self, kind)


def check_size_and_nesting(name: str, text: str) -> None:
    """Refuse a constraint's text over MAX_GRAMMAR_BYTES or nested deeper than MAX_NESTING, without parsing it
    (linear in its length, no recursion). ValueError naming the field."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_GRAMMAR_BYTES:
        raise ValueError(f"structured_outputs.{name}: at most {MAX_GRAMMAR_BYTES} bytes, got {size}")
    depth = nesting_depth(text, "json" if name in ("json", "structural_tag") else name)
    if depth > MAX_NESTING:
        raise ValueError(f"structured_outputs.{name}: nested {depth} levels deep; at most {MAX_NESTING}")


# What does not nest, removed before the brackets are counted: JSON strings; a regex's escapes and character
# classes; a grammar's string literals and character classes.
_INERT = {"json": re.compile(r'"(?:[^"\\]|\\.)*"?'),
          "regex": re.compile(r"\\.|\[(?:\\.|[^\]\\])*\]?"),
          "grammar": re.compile(r'"(?:[^"\\]|\\.)*"?|\[(?:\\.|[^\]\\])*\]?')}
_OPEN = {"json": "[{", "regex": "(", "grammar": "("}
_BRACKETS = {"json": re.compile(r"[\[\]{}]"), "regex": re.compile(r"[()]"), "grammar": re.compile(r"[()]")}


def nesting_depth(text: str, syntax: str) -> int:
    """How deep the brackets of a JSON text, regex or grammar nest (an upper bound for malformed text)."""
    brackets = _BRACKETS[syntax].findall(_INERT[syntax].sub("", text))
    opening = _OPEN[syntax]
    return max(accumulate(1 if b in opening else -1 for b in brackets), default=0)


def _json_text(value: Any, name: str, types, what: str) -> str:
    if isinstance(value, str):
        try:
            parsed = json.loads(value)  # its size and nesting are checked already
        except json.JSONDecodeError as exc:
            raise ValueError(f"structured_outputs.{name}: not valid JSON ({exc})") from None
    else:
        parsed = value
        try:
            value = json.dumps(value)
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"structured_outputs.{name}: not JSON-serialisable ({exc})") from None
        check_size_and_nesting(name, value)
    if not isinstance(parsed, types):
        raise ValueError(f"structured_outputs.{name}: {what}, got {type(parsed).__name__}")
    return value
