"""Training text this machine already has: the Python standard library's sources and the installed
packages' code and documentation. From them come code prompts ("write a function that ...",
"complete this function"), prose prompts (explain or summarise a passage of documentation) and raw
text the target reads teacher-forced. Nothing is downloaded, and benchmark sets that happen to be
installed (evaluation harnesses' task folders) are left out.

Files are split into training and held-out by a hash of their path relative to their root, so the
same file lands on the same side on every machine and in every run, and no prompt or text from a
held-out file is ever trained on.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import random
import sysconfig
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_SHARE = 20  # one file in this many is held out
CODE_SUFFIXES = (".py",)
PROSE_SUFFIXES = (".md", ".rst", ".txt")
# Path parts that mark benchmark sets or evaluation harnesses: never read.
EXCLUDED_PARTS = {"lm_eval", "humaneval", "human_eval", "mbpp", "evalplus", "bigcode_eval", "datasets", "tests",
                  "test", "__pycache__", "site-packages", "dist-packages"}
MAX_FILE_BYTES = 200_000
SOURCES_FORMAT = "beastserve-distill-sources-v1"


@dataclass(frozen=True)
class SourceFile:
    path: Path
    relative: str  # to its root: what the held-out split hashes
    held_out: bool


def default_roots() -> list[Path]:
    """The standard library and the installed packages of the running interpreter."""
    paths = sysconfig.get_paths()
    return [Path(p) for p in dict.fromkeys((paths["stdlib"], paths["purelib"], paths["platlib"])) if Path(p).is_dir()]


def is_held_out(relative: str) -> bool:
    return int(hashlib.sha1(relative.encode()).hexdigest(), 16) % HELD_OUT_SHARE == 0


def find_files(roots: list[Path], suffixes: tuple[str, ...]) -> list[SourceFile]:
    """Files under roots with one of the suffixes, sorted, each marked held out or not. Excluded
    folders (tests, benchmark sets, nested site-packages) are not walked."""
    found = []
    for root in roots:
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d.lower() not in EXCLUDED_PARTS and not d.startswith("."))
            for name in sorted(names):
                path = Path(folder, name)
                if path.suffix not in suffixes or name.startswith("test_"):
                    continue
                relative = path.relative_to(root).as_posix()
                found.append(SourceFile(path, relative, is_held_out(relative)))
    return found


def read_text(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def functions(source: str) -> list[tuple[str, str, str]]:
    """(signature line, docstring, source) of every function with a docstring, methods included."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines, found = source.splitlines(keepends=True), []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        segment = "".join(lines[node.lineno - 1:node.end_lineno])  # get_source_segment splits the file each time
        if not doc or not segment or len(doc) < 20:
            continue
        signature = _signature(segment)
        found.append((signature, doc, textwrap.dedent(segment)))
    return found


def _signature(segment: str) -> str:
    """The def line(s) of a function's source, without the colon: up to the first line ending in one."""
    lines = []
    for line in segment.splitlines():
        lines.append(line.strip())
        if line.rstrip().endswith(":"):
            break
    return " ".join(lines).rstrip(":").replace("( ", "(").replace(" )", ")")


CODE_ASKS = (
    "Write a Python function `{name}` that does the following: {summary}",
    "Complete this Python function:\n\n```python\n{head}\n```",
    "Implement `{signature}` in Python. {summary}",
    "Explain what this Python function does, step by step:\n\n```python\n{code}\n```",
    "Write a Python function that {lower_summary} Include a docstring and an example.",
    "Add comments and type hints to this function:\n\n```python\n{code}\n```",
)
PROSE_ASKS = (
    "Explain this passage in simple words:\n\n{text}",
    "Summarise the following documentation in a few sentences:\n\n{text}",
    "What questions could a new user have after reading this? Answer them.\n\n{text}",
    "Rewrite this as a short tutorial with an example:\n\n{text}",
)


def code_prompts(source: str, rng: random.Random, max_code_chars: int = 1200) -> list[str]:
    """Requests about the functions of one Python file: write one from its docstring, complete one from
    its signature and docstring, explain or annotate one."""
    prompts = []
    for signature, doc, code in functions(source):
        summary = " ".join(doc.split("\n\n")[0].split())
        name = signature.split("def ", 1)[-1].split("(", 1)[0]
        head = f'{signature.removeprefix("async ")}:\n    """{doc.split(chr(10) * 2)[0].strip()}\n    """'
        ask = rng.choice(CODE_ASKS)
        if "{code}" in ask and len(code) > max_code_chars:
            ask = CODE_ASKS[0]
        prompts.append(ask.format(name=name, summary=summary, head=head, signature=signature.removeprefix("def "),
                                  code=code, lower_summary=summary[:1].lower() + summary[1:]))
    return prompts


def paragraphs(text: str, min_chars: int = 200, max_chars: int = 1200) -> list[str]:
    """Prose paragraphs of a documentation file or docstring: blocks of words, not code or tables."""
    found = []
    for block in text.split("\n\n"):
        block = block.strip()
        letters = sum(c.isalpha() or c.isspace() for c in block)
        if min_chars <= len(block) <= max_chars and letters > 0.85 * len(block) and not block.startswith((">>>", "..")):
            found.append(" ".join(block.split()))
    return found


def prose_prompts(text: str, rng: random.Random) -> list[str]:
    """Requests about passages of documentation (a .md/.rst/.txt file, or a Python file's docstrings)."""
    return [rng.choice(PROSE_ASKS).format(text=passage) for passage in paragraphs(text)]


@dataclass
class LocalData:
    """Prompts and texts from local files, split by file into training and held-out."""

    code_prompts: list[str]
    prose_prompts: list[str]
    texts: list[str]
    held_out_code_prompts: list[str]
    held_out_prose_prompts: list[str]
    files: int
    held_out_files: int


def local_data(roots: list[Path] | None = None, seed: int = 0, max_files: int | None = None,
               max_seconds: float | None = None) -> LocalData:
    """Read the code and documentation under roots (default: the standard library and installed
    packages), shuffled by seed, at most max_files of each kind, each file read and parsed once.
    Held-out files are read first; with max_seconds, reading stops once that much time has passed
    (the files found so far make the data), so a machine with many packages never spends a run's
    budget scanning them."""
    rng = random.Random(seed)
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    roots = default_roots() if roots is None else roots
    every = find_files(roots, CODE_SUFFIXES + PROSE_SUFFIXES)
    code = [f for f in every if f.path.suffix in CODE_SUFFIXES]
    prose = [f for f in every if f.path.suffix in PROSE_SUFFIXES]
    rng.shuffle(code)
    rng.shuffle(prose)
    chosen = code[:max_files] + prose[:max_files]
    found = {key: [] for key in ("code", "prose", "texts", "held_code", "held_prose")}
    files = held_files = 0
    for file in sorted(chosen, key=lambda f: not f.held_out):  # a stable sort: shuffled within each side
        if deadline is not None and time.monotonic() > deadline:
            break
        text = read_text(file.path)
        files, held_files = files + 1, held_files + file.held_out
        if not text:
            continue
        held = "held_" if file.held_out else ""
        if file.path.suffix in CODE_SUFFIXES:
            found[held + "code"] += code_prompts(text, rng)
            text_of_docs = "\n\n".join(doc for _, doc, _ in functions(text))
            found[held + "prose"] += prose_prompts(text_of_docs, rng)
        else:
            found[held + "prose"] += prose_prompts(text, rng)
        if not file.held_out:
            found["texts"].append(text)
    shuffled = lambda items: rng.sample(items, len(items))  # noqa: E731
    return LocalData(code_prompts=shuffled(found["code"]), prose_prompts=shuffled(found["prose"]),
                     texts=shuffled(found["texts"]), held_out_code_prompts=shuffled(found["held_code"]),
                     held_out_prose_prompts=shuffled(found["held_prose"]), files=files, held_out_files=held_files)


def save_local_data(path: Path, data: LocalData, max_prompts: int | None = None,
                    max_text_chars: int | None = None) -> int:
    """Write data to one gzipped JSON file (what `--prompts-from` reads), keeping at most max_prompts
    training prompts of each kind and about max_text_chars of raw text: a file small enough to
    travel with a run to another machine. Returns its size in bytes."""
    fields = dict(vars(data))
    for key in ("code_prompts", "prose_prompts"):
        fields[key] = fields[key][:max_prompts]
    if max_text_chars is not None:
        kept, chars = [], 0
        for text in fields["texts"]:
            if chars >= max_text_chars:
                break
            kept.append(text[:max_text_chars - chars])
            chars += len(kept[-1])
        fields["texts"] = kept
    payload = json.dumps({"format": SOURCES_FORMAT, **fields}).encode()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(payload, compresslevel=6))
    tmp.replace(path)
    return Path(path).stat().st_size


def load_local_data(path: Path) -> LocalData:
    """A file save_local_data() wrote."""
    try:
        fields = json.loads(gzip.decompress(Path(path).read_bytes()))
    except (OSError, EOFError, ValueError) as exc:
        raise ValueError(f"--prompts-from: {path} is not a prompts file ({exc})") from None
    if fields.pop("format", None) != SOURCES_FORMAT:
        raise ValueError(f"--prompts-from: {path} is not a {SOURCES_FORMAT} file")
    return LocalData(**fields)
