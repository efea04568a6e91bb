"""speculative= names and the proposers they build. A new method is one file and one line here."""

from __future__ import annotations

import importlib

PROPOSERS = {
    "ngram": "scheduler.speculative.ngram:NgramProposer",
    "draft": "scheduler.speculative.draft.proposer:DraftModelProposer",
}


def proposer_class(name: str):
    """The Proposer class registered under name."""
    module, _, attr = PROPOSERS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
