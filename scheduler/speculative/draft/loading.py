"""Loading the draft model an EngineConfig asks for, and checking it fits the target."""

from __future__ import annotations

import logging

import torch

from scheduler.config import EngineConfig
from scheduler.speculative.draft import compact
from scheduler.worker.models import LoadedModel, load_model

log = logging.getLogger(__name__)


def load_draft(config: EngineConfig, target: LoadedModel, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """The draft model, refused with a message naming the problem when it can't serve this target.
    Without draft_model, the draft shipped with beastserve for this target, when there is one."""
    path = config.draft_model
    if path is None:
        path = compact.shipped_draft_for(target)
        if path is None:
            raise ValueError("speculative='draft' needs draft_model (--draft-model): no draft shipped with "
                             f"beastserve (in {compact.SHIPPED_DRAFTS}) was made for this target")
        log.info("draft model: %s, shipped for this target", path)
    try:
        if compact.is_compact(path):
            draft = compact.load_compact(path, target, dtype, device)
        else:
            draft = load_model(path, None, config.load_format, dtype, device, None, config.cache_dir)
        vocab = compact.load_vocab(path, target.config.vocab_size)
    except (ValueError, OSError) as exc:
        raise ValueError(f"draft_model: {exc}") from None
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft_model: its vocabulary has {draft.config.vocab_size} tokens, the target's "
                         f"{target.config.vocab_size}; a draft must share the target's tokenizer")
    if draft.tokenizer is not None and target.tokenizer is not None and path != config.model:
        if draft.tokenizer.get_vocab() != target.tokenizer.get_vocab():
            raise ValueError("draft_model: its tokenizer maps tokens to different ids than the target's")
    if vocab is not None:
        draft.model.restrict_vocab(vocab)
        log.info("draft model: LM head over %d of %d tokens", len(vocab), target.config.vocab_size)
    return draft
