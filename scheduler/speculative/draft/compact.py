"""The compact form of a distilled draft: only its own layers, borrowing the target's embeddings
and LM head at load time, and the fingerprint that proves the target is the one it was made for.

A compact draft directory holds config.json (the draft's transformers config),
draft_layers.safetensors (decoder layers and final norm, bfloat16) and draft.json (what it
borrows, the target's fingerprint and name, and the command that made it). A draft of either
form may hold draft_vocab.safetensors: the token ids its LM head is restricted to (the target's
most frequent output tokens), so each draft pass computes only those logits. Drafts shipped with
beastserve live in scheduler/speculative/drafts/<name>/ and are found by the target's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from scheduler.worker.models.loader import (
    LoadedModel,
    context_length,
    load_config,
    model_from_state_dict,
    resolve_model,
)

COMPACT_FORMAT = "beastserve-compact-draft-v1"
DRAFT_JSON = "draft.json"
LAYERS_FILE = "draft_layers.safetensors"
VOCAB_FILE = "draft_vocab.safetensors"
BORROWED = ("model.embed_tokens.weight", "lm_head.weight")
SHIPPED_DRAFTS = Path(__file__).resolve().parent.parent / "drafts"


def target_fingerprint(model) -> str:
    """sha256 of the shapes and sign bits of the target's embedding and LM head (ours or a transformers
    model: the attribute names are the same). Rounding between float formats never flips a sign, so an
    fp32 target on CPU and a bf16 or fp16 one on GPU agree, while two different trainings differ in
    millions of signs."""
    return vocab_fingerprint(model.model.embed_tokens.weight, model.lm_head.weight)


def vocab_fingerprint(embed: torch.Tensor, head: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for weight in (embed, head):
        digest.update(str(tuple(weight.shape)).encode())
        digest.update(np.packbits(torch.signbit(weight.detach()).cpu().numpy()).tobytes())
    return digest.hexdigest()


def is_compact(path) -> bool:
    return isinstance(path, (str, Path)) and (Path(path) / DRAFT_JSON).is_file() and \
        read_manifest(path).get("format") == COMPACT_FORMAT


def read_manifest(path) -> dict:
    return json.loads((Path(path) / DRAFT_JSON).read_text())


def save_compact(draft, out: Path, manifest: dict) -> int:
    """Write the draft's own weights (bfloat16), its config and the manifest. Returns the weights' bytes."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    own = {name: t.detach().to(torch.bfloat16).contiguous().cpu() for name, t in draft.state_dict().items()
           if name not in BORROWED}
    save_file(own, str(out / LAYERS_FILE))
    draft.config.save_pretrained(out)
    (out / DRAFT_JSON).write_text(json.dumps(dict(manifest, format=COMPACT_FORMAT, borrowed=list(BORROWED)),
                                             indent=1) + "\n")
    return (out / LAYERS_FILE).stat().st_size


def load_compact(path, target, dtype: torch.dtype, device: torch.device):
    """A LoadedModel for the compact draft in `path`, its embeddings and LM head taken from `target`
    (a LoadedModel). ValueError when the draft was made for another target."""
    from safetensors.torch import load_file

    manifest = read_manifest(path)
    embed, head = target.vocab_weights()
    found = vocab_fingerprint(embed, head)
    if manifest.get("target_fingerprint") != found:
        raise ValueError(f"made for another target: {path} was distilled from {manifest.get('target', '?')!r} "
                         f"(fingerprint {str(manifest.get('target_fingerprint'))[:16]}), this target's fingerprint "
                         f"is {found[:16]}")
    config = load_config(resolve_model(str(path)))
    state = load_file(str(Path(path) / LAYERS_FILE))
    state["model.embed_tokens.weight"], state["lm_head.weight"] = embed, head
    max_positions = min(context_length(config, None), target.max_positions)
    return LoadedModel(config, None, model_from_state_dict(config, state, dtype, device, max_positions), max_positions)


def save_vocab(out: Path, token_ids: list[int]) -> None:
    from safetensors.torch import save_file

    save_file({"token_ids": torch.tensor(sorted(token_ids), dtype=torch.int32)}, str(Path(out) / VOCAB_FILE))


def load_vocab(path, vocab_size: int) -> torch.Tensor | None:
    """The token ids the draft in `path` restricts its LM head to, or None (the whole vocabulary)."""
    from safetensors.torch import load_file

    file = Path(path) / VOCAB_FILE if isinstance(path, (str, Path)) else None
    if file is None or not file.is_file():
        return None
    token_ids = load_file(str(file))["token_ids"].long()
    if token_ids.ndim != 1 or not len(token_ids) or int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab_size \
            or len(token_ids.unique()) != len(token_ids):
        raise ValueError(f"{file}: needs distinct token ids in [0, {vocab_size})")
    return token_ids


def shipped_draft_for(target) -> Path | None:
    """The draft shipped with beastserve that was made for this target, if any."""
    return shipped_for(target, SHIPPED_DRAFTS, is_compact, read_manifest)


def shipped_for(target, directory: Path, is_kind, manifest) -> Path | None:
    """The directory in `directory` of one kind (is_kind) whose manifest records this target's fingerprint."""
    if not directory.is_dir():
        return None
    found = vocab_fingerprint(*target.vocab_weights())
    for path in sorted(directory.iterdir()):
        if is_kind(path) and manifest(path).get("target_fingerprint") == found:
            return path
    return None


def save_full(draft, tokenizer, out: Path, manifest: dict) -> None:
    """A plain Hugging Face directory (bfloat16 weights, the target's tokenizer) any loader takes."""
    draft.to(torch.bfloat16).save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / DRAFT_JSON).write_text(json.dumps(dict(manifest, format="beastserve-draft-v1"), indent=1) + "\n")
