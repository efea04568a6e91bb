"""Reading a GGUF file's metadata once for config, tokenizer and weights.

transformers opens a GGUF file with a fresh `gguf.GGUFReader` for the config, again for the tokenizer's
config, again for the model's config and once more for the weights; each builds every metadata field
(a 49k-token vocabulary and its merges) in Python, seconds apiece. Then, naming the weights, it builds
gguf's tensor-name table once per module of the model (~400 times for the default model, 4 s), always
for the same architecture and depth. Within `gguf_parsed_once()` every `GGUFReader(path)` returns the
first reader made for that path and each name table is built once: both are only read from.
"""

from __future__ import annotations

import functools
import os
import threading
from contextlib import contextmanager

_lock = threading.Lock()


@contextmanager
def gguf_parsed_once():
    import gguf
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging

    with _lock:
        originals = gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.tqdm
        readers: dict[tuple[str, str], object] = {}

        def reader(path, mode="r"):
            key = (os.path.realpath(path), mode)
            if key not in readers:
                readers[key] = originals[0](path, mode)
            return readers[key]

        gguf.GGUFReader = reader
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(originals[1])
        # Its de-quantising loop calls tqdm itself; through transformers' tqdm, disable_progress_bar() holds.
        gguf_utils.tqdm = logging.tqdm
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.tqdm = originals
