"""A saved EAGLE head: a directory holding head.safetensors (the head's own weights: fc, the decoder
layer, the final norm; bfloat16 or float16) and head.json:

    {"format": "beastserve-eagle-head-v1", "config": {...head_config(): dims, rope, layer_ids...},
     "target": "<what --model named>", "target_fingerprint": "<compact.target_fingerprint>",
     "command": "<the command that made it>", "borrowed": ["model.embed_tokens.weight", "lm_head.weight"], ...}

and, optionally, draft_vocab.safetensors (the draft's format: the token ids its logits are restricted
to). The target's embedding table and LM head are borrowed at load time, after its fingerprint is
checked. Heads shipped with beastserve live in scheduler/speculative/heads/<name>/ and are found by
the target's fingerprint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scheduler.speculative.draft.compact import BORROWED, load_vocab, shipped_for, vocab_fingerprint
from scheduler.speculative.eagle.head import EagleHead

HEAD_FORMAT = "beastserve-eagle-head-v1"
HEAD_JSON = "head.json"
WEIGHTS_FILE = "head.safetensors"
SHIPPED_HEADS = Path(__file__).resolve().parent.parent / "heads"


def is_head(path) -> bool:
    return isinstance(path, (str, Path)) and (Path(path) / HEAD_JSON).is_file() and \
        read_manifest(path).get("format") == HEAD_FORMAT


def read_manifest(path) -> dict:
    return json.loads((Path(path) / HEAD_JSON).read_text())


def save_head(head: EagleHead, out, manifest: dict, dtype: torch.dtype = torch.bfloat16) -> int:
    """Write the head's own weights (in dtype) and head.json: manifest (target, target_fingerprint,
    command, anything else worth keeping) plus the head's config. Returns the weights' bytes."""
    from safetensors.torch import save_file

    if "target_fingerprint" not in manifest:
        raise ValueError("a head's manifest needs target_fingerprint (compact.target_fingerprint)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    own = {name: t.detach().to(dtype).contiguous().cpu() for name, t in head.state_dict().items()}
    save_file(own, str(out / WEIGHTS_FILE))
    (out / HEAD_JSON).write_text(json.dumps(dict(manifest, format=HEAD_FORMAT, config=head.config,
                                                 borrowed=list(BORROWED)), indent=1) + "\n")
    return (out / WEIGHTS_FILE).stat().st_size


def check_target(path, target) -> None:
    """ValueError unless the head in `path` was made for `target` (a LoadedModel)."""
    manifest = read_manifest(path)
    found = vocab_fingerprint(*target.vocab_weights())
    if manifest.get("target_fingerprint") != found:
        raise ValueError(f"made for another target: {path} was trained for {manifest.get('target', '?')!r} "
                         f"(fingerprint {str(manifest.get('target_fingerprint'))[:16]}), this target's fingerprint "
                         f"is {found[:16]}")
    config = manifest["config"]
    if config["target_num_layers"] != target.config.num_hidden_layers or \
            config["hidden_size"] != target.config.hidden_size:
        raise ValueError(f"{path}: made for a target of {config['target_num_layers']} layers of "
                         f"{config['hidden_size']}, this one has {target.config.num_hidden_layers} of "
                         f"{target.config.hidden_size}")


def load_head(path, target, dtype: torch.dtype, device: torch.device) -> EagleHead:
    """The head in `path`, bound to `target`'s (a LoadedModel) embeddings and LM head; ValueError when it
    was made for another target or its files are not a head's."""
    from safetensors.torch import load_file

    if not is_head(path):
        raise ValueError(f"{path}: not an EAGLE head (no {HEAD_JSON} of format {HEAD_FORMAT})")
    check_target(path, target)
    manifest = read_manifest(path)
    with torch.device("meta"):
        head = EagleHead(manifest["config"], target.max_positions)
    state = load_file(str(Path(path) / WEIGHTS_FILE))
    missing = set(head.state_dict()) ^ set(state)
    if missing:
        raise ValueError(f"{path}/{WEIGHTS_FILE}: weights do not match the head's config ({sorted(missing)[:4]})")
    head.load_state_dict({name: t.to(dtype) for name, t in state.items()}, assign=True)
    head.rotary = type(head.rotary)(head.llama_config, target.max_positions)  # meta buffers: build for real
    head.to(device)
    embed, lm_head = target.vocab_weights()
    return head.bind(embed, lm_head, load_vocab(path, target.config.vocab_size))


def shipped_head_for(target) -> Path | None:
    """The head shipped with beastserve that was made for this target, if any."""
    return shipped_for(target, SHIPPED_HEADS, is_head, read_manifest)
