"""A run's wall-time cap split between its phases (answers, reading, training, held-out evaluation):
each phase, when it starts, gets its share of the time still left, so every phase is guaranteed its
share of the cap and one that finishes early (or is skipped: a resumed run's data is already made)
leaves its time to those after it."""

from __future__ import annotations

import argparse
import time

PHASES = ("answers", "read", "train", "eval")


def phase_shares(text: str) -> dict[str, float]:
    """'answers=0.3,read=0.2,train=0.45,eval=0.05' -> {phase: share}; phases left out get 0."""
    shares = dict.fromkeys(PHASES, 0.0)
    for part in text.split(","):
        phase, _, value = part.partition("=")
        if phase not in PHASES:
            raise argparse.ArgumentTypeError(f"unknown phase {phase!r} ({', '.join(PHASES)})")
        try:
            shares[phase] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{phase}: not a number: {value!r}") from None
    if min(shares.values()) < 0 or shares["train"] <= 0:
        raise argparse.ArgumentTypeError(f"shares must be >= 0, train's > 0, got {text!r}")
    return shares


class PhaseClock:
    """Deadlines for the phases of a run that must end by `end` (time.monotonic())."""

    def __init__(self, end: float, shares: dict[str, float]):
        self.end, self.shares = end, shares
        self.spent: dict[str, float] = {}
        self._started: dict[str, float] = {}

    def start(self, phase: str) -> float:
        """Begin `phase`: returns its deadline, its share of the time left among it and those after it."""
        now = time.monotonic()
        self._started[phase] = now
        left = sum(self.shares[p] for p in PHASES[PHASES.index(phase):])
        share = self.shares[phase] / left if left > 0 else 1.0
        return now + share * max(0.0, self.end - now)

    def stop(self, phase: str) -> None:
        self.spent[phase] = round(self.spent.get(phase, 0.0) + time.monotonic() - self._started.pop(phase), 1)
