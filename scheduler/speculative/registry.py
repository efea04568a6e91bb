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


def method_of(proposer) -> str:
    """The name a proposer is registered under (what speculative="best" chose)."""
    path = f"{type(proposer).__module__}:{type(proposer).__qualname__}"
    return next((name for name, where in PROPOSERS.items() if where == path), type(proposer).__name__)
