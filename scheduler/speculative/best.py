"""speculative="best": the best proposer available for the target, chosen when it is loaded."""

from __future__ import annotations

import logging

from scheduler.config import EngineConfig
from scheduler.worker.models import LoadedModel

log = logging.getLogger(__name__)


def best_proposer(config: EngineConfig, target: LoadedModel) -> str:
    """An EAGLE head (the one named, else one shipped for this target), else a draft model (named or
    shipped), else n-gram lookup."""
    from scheduler.speculative.draft.compact import shipped_draft_for
    from scheduler.speculative.eagle.files import shipped_head_for

    if config.eagle_head is not None:
        name, why = "eagle", f"the EAGLE head {config.eagle_head}"
    elif (head := shipped_head_for(target)) is not None:
        name, why = "eagle", f"the EAGLE head shipped for this model ({head.name})"
    elif config.draft_model is not None:
        name, why = "draft", f"the draft model {config.draft_model}"
    elif (draft := shipped_draft_for(target)) is not None:
        name, why = "draft", f"the draft shipped for this model ({draft.name})"
    else:
        name, why = "ngram", "no EAGLE head or draft model for this model"
    log.info("speculative=best: %s, %s", name, why)
    return name
