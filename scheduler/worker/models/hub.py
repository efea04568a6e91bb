"""Hugging Face model ids (`HuggingFaceTB/SmolLM2-135M-Instruct`): the local cache first, else a download
where the hub can be reached. The hub's own library keeps the cache (HF_HOME / HF_HUB_CACHE)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]")
# A model directory's files: config, tokenizer, chat template, safetensors weights (no pickles, no code).
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def is_repo_id(model: str) -> bool:
    """`owner/name` that is not a path here."""
    return bool(_REPO_ID.fullmatch(model)) and not Path(model).expanduser().exists()


def cached_snapshot(repo_id: str) -> Path | None:
    """The model's directory in the local cache, or None when it has not been downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES, local_files_only=True))
    except LocalEntryNotFoundError:
        return None
    return path if (path / "config.json").is_file() else None


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_repo_id(repo_id: str) -> None:
    """Before anything is loaded: the model is in the cache, or the hub is reachable and has it."""
    if cached_snapshot(repo_id) is not None:
        return
    from huggingface_hub import constants

    if hub_offline():
        raise FileNotFoundError(f"{repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                                "HF_HUB_OFFLINE is set; download it where the hub is reachable "
                                f"(`hf download {repo_id}`) or give a local path")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        exists = HfApi().repo_exists(repo_id)
    except (HfHubHTTPError, OSError) as exc:
        raise FileNotFoundError(f"{repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub "
                                f"cannot be reached ({type(exc).__name__})") from None
    if not exists:
        raise FileNotFoundError(f"{repo_id}: no such model on the Hugging Face hub (nor a file or directory here)")


def snapshot(repo_id: str) -> Path:
    """The model's directory: from the cache, else downloaded into it."""
    cached = cached_snapshot(repo_id)
    if cached is not None:
        return cached
    check_repo_id(repo_id)
    from huggingface_hub import snapshot_download

    log.info("downloading %s from the Hugging Face hub", repo_id)
    return Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES))
