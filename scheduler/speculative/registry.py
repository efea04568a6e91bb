"""The proposer a speculative= name builds. The names live with the engine's options
(scheduler/config.py PROPOSERS), so the configuration validates them without importing any proposer."""

from __future__ import annotations

import importlib

from scheduler.config import PROPOSERS

__all__ = ["PROPOSERS", "method_of", "proposer_class"]


def proposer_class(name: str):
    """The Proposer class registered under name."""
    module, _, attr = PROPOSERS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def method_of(proposer) -> str:
    """The name a proposer is registered under (what speculative="best" chose)."""
    path = f"{type(proposer).__module__}:{type(proposer).__qualname__}"
    return next((name for name, where in PROPOSERS.items() if where == path), type(proposer).__name__)
