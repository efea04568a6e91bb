"""speculative="best": the best proposer available for the target, chosen when it is loaded."""

from __future__ import annotations

import logging

from scheduler.config import EngineConfig
from scheduler.worker.models import LoadedModel

log = logging.getLogger(__name__)


def best_proposer(config: EngineConfig, target: LoadedModel) -> str:
    """An EAGLE head (the one named, else one shipped for this target), else a draft model (named or
    shipped), else n-gram lookup. On CUDA a shipped head is passed over: while its draft chain ran eagerly
    (~5 ms a step on an H100 where the target's graphed step takes ~1 ms) it was slower than the shipped draft
    and n-gram lookup (bench/results/distill_eagle_h100_two_calls/README.md); its graphed chain
    (eagle/chain.py) is not measured there yet."""
    from scheduler.speculative.draft.compact import shipped_draft_for
    from scheduler.speculative.eagle.files import shipped_head_for

    if config.eagle_head is not None:
        name, why = "eagle", f"the EAGLE head {config.eagle_head}"
    elif config.torch_device().type != "cuda" and (head := shipped_head_for(target)) is not None:
        name, why = "eagle", f"the EAGLE head shipped for this model ({head.name})"
    elif config.draft_model is not None:
        name, why = "draft", f"the draft model {config.draft_model}"
    elif (draft := shipped_draft_for(target)) is not None:
        name, why = "draft", f"the draft shipped for this model ({draft.name})"
    else:
        name, why = "ngram", "no EAGLE head or draft model for this model"
    log.info("speculative=best: %s, %s", name, why)
    return name
