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
import hashlib
import os
import random
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_SHARE = 20  # one file in this many is held out
CODE_SUFFIXES = (".py",)
PROSE_SUFFIXES = (".md", ".rst", ".txt")
# Path parts that mark benchmark sets or evaluation harnesses: never read.
EXCLUDED_PARTS = {"lm_eval", "humaneval", "human_eval", "mbpp", "evalplus", "bigcode_eval", "datasets", "tests",
                  "test", "__pycache__", "site-packages", "dist-packages"}
MAX_FILE_BYTES = 200_000


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


def code_prompts(files: list[SourceFile], rng: random.Random, max_code_chars: int = 1200) -> list[str]:
    """Requests about the functions of Python files: write one from its docstring, complete one from
    its signature and docstring, explain or annotate one."""
    prompts = []
    for file in files:
        for signature, doc, code in functions(read_text(file.path) or ""):
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


def prose_prompts(files: list[SourceFile], rng: random.Random) -> list[str]:
    """Requests about passages of documentation: .md/.rst/.txt files and Python docstrings."""
    prompts = []
    for file in files:
        text = read_text(file.path) or ""
        if file.path.suffix == ".py":
            text = "\n\n".join(doc for _, doc, _ in functions(text))
        for passage in paragraphs(text):
            prompts.append(rng.choice(PROSE_ASKS).format(text=passage))
    return prompts


def raw_texts(files: list[SourceFile]) -> list[str]:
    """Whole files, as the target reads them teacher-forced."""
    return [text for file in files if (text := read_text(file.path))]


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


def local_data(roots: list[Path] | None = None, seed: int = 0, max_files: int | None = None) -> LocalData:
    """Read the code and documentation under roots (default: the standard library and installed
    packages), shuffled by seed, at most max_files of each kind."""
    rng = random.Random(seed)
    roots = default_roots() if roots is None else roots
    every = find_files(roots, CODE_SUFFIXES + PROSE_SUFFIXES)
    code = [f for f in every if f.path.suffix in CODE_SUFFIXES]
    prose = [f for f in every if f.path.suffix in PROSE_SUFFIXES]
    rng.shuffle(code)
    rng.shuffle(prose)
    code, prose = code[:max_files], prose[:max_files]
    train_code, held_code = [f for f in code if not f.held_out], [f for f in code if f.held_out]
    train_prose, held_prose = [f for f in prose if not f.held_out], [f for f in prose if f.held_out]
    shuffled = lambda items: rng.sample(items, len(items))  # noqa: E731
    return LocalData(
        code_prompts=shuffled(code_prompts(train_code, rng)),
        prose_prompts=shuffled(prose_prompts(train_prose + train_code, rng)),
        texts=shuffled(raw_texts(train_code) + raw_texts(train_prose)),
        held_out_code_prompts=shuffled(code_prompts(held_code, rng)),
        held_out_prose_prompts=shuffled(prose_prompts(held_prose + held_code, rng)),
        files=len(code) + len(prose), held_out_files=len(held_code) + len(held_prose))
