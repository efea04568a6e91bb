"""A directory of parsed GGUF models, so only the first start pays for the GGUF parser.

One entry per GGUF file's content and dtype: `config.json`, the tokenizer's files as `save_pretrained`
writes them (chat template included) and `model.safetensors`, the de-quantised weights, read back
memory-mapped. The key is the sha256 of the file's bytes, 0.07 s for the 98 MB default model, so no path or
mtime is trusted. An entry is built in a temporary directory and renamed into place, and `entry.json`,
written last, lists every file with its size and the transformers version that parsed the file: a
directory without it, or whose files or version disagree with it, is never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT = 1
MANIFEST = "entry.json"
WEIGHTS = "model.safetensors"
DISABLED = "off"


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "beastserve"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in 64-byte-aligned memory. A file's tensors start where its header ends, 8-byte aligned;
    the CPU's matmul kernels take other paths for such memory, and round differently than for the same
    weights parsed fresh."""
    return tensor.clone() if tensor.data_ptr() % 64 else tensor


@dataclass
class CacheEntry:
    path: Path
    source_sha256: str

    @classmethod
    def for_file(cls, cache_dir: str | Path | None, gguf_path: Path, dtype: torch.dtype) -> CacheEntry:
        digest = file_sha256(gguf_path)
        root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        return cls(root / f"{digest}-{str(dtype).removeprefix('torch.')}", digest)

    def is_complete(self) -> bool:
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
            return (manifest.get("format") == FORMAT and manifest.get("source_sha256") == self.source_sha256
                    and manifest.get("transformers") == _transformers_version()
                    and all((self.path / name).stat().st_size == size for name, size in manifest["files"].items()))
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            return False

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS

    def load_weights(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return {name: aligned(t) for name, t in load_file(self.weights_file).items()}

    def write(self, config, tokenizer, state_dict: dict[str, torch.Tensor], source_name: str) -> None:
        """Write the entry in a sibling temporary directory, then rename it into place. When another
        process got there first, its entry stands and ours is dropped."""
        from safetensors.torch import save_file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        try:
            config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            save_file(_unshared(state_dict, config), tmp / WEIGHTS)
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            manifest = dict(format=FORMAT, source=source_name, source_sha256=self.source_sha256,
                            transformers=_transformers_version(), files=files)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            _fsync_tree(tmp)
            try:
                tmp.rename(self.path)
            except OSError:
                if not self.is_complete():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _unshared(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """safetensors stores no aliases: a tied LM head is re-tied on load, so it is left out."""
    tensors = dict(state_dict)
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    return {name: t.contiguous() for name, t in tensors.items()}


def _fsync_tree(path: Path) -> None:
    """A rename that reaches the disk before the files' contents would publish an entry of holes."""
    for child in path.iterdir():
        with open(child, "rb") as f:
            os.fsync(f.fileno())
