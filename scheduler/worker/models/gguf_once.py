"""Reading a GGUF file's metadata once for config, tokenizer and weights.

transformers opens a GGUF file with a fresh `gguf.GGUFReader` for the config, again for the tokenizer's
config, again for the model's config and once more for the weights; each builds every metadata field
(a 49k-token vocabulary and its merges) in Python, seconds apiece. Within `shared_gguf_reader()` every
`GGUFReader(path)` call returns the first reader made for that path: the reader is only read from.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

_lock = threading.Lock()


@contextmanager
def shared_gguf_reader():
    import gguf
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging

    with _lock:
        original_reader, original_tqdm = gguf.GGUFReader, gguf_utils.tqdm
        readers: dict[tuple[str, str], object] = {}

        def reader(path, mode="r"):
            key = (os.path.realpath(path), mode)
            if key not in readers:
                readers[key] = original_reader(path, mode)
            return readers[key]

        gguf.GGUFReader = reader
        # Its de-quantising loop calls tqdm itself; through transformers' tqdm, disable_progress_bar() holds.
        gguf_utils.tqdm = logging.tqdm
        try:
            yield
        finally:
            gguf.GGUFReader, gguf_utils.tqdm = original_reader, original_tqdm
