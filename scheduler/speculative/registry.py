"""speculative= names and the proposers they build. A new method is one file and one line here."""

from __future__ import annotations

import importlib

PROPOSERS = {
    "ngram": "scheduler.speculative.ngram:NgramProposer",
    "draft": "scheduler.speculative.draft.proposer:DraftModelProposer",
    "eagle": "scheduler.speculative.eagle.proposer:EagleProposer",
}
# Methods that borrow the target's whole embedding table and LM head (gathered under tensor parallelism).
BORROWS_VOCAB = ("draft", "eagle", "best")


def proposer_class(name: str):
    """The Proposer class registered under name."""
    module, _, attr = PROPOSERS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
