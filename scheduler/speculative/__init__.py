"""Speculative decoding inside the batch step: proposers draft, the target verifies in the same
forward pass as everything else, rejection sampling keeps the output distribution exact."""

from scheduler.speculative.speculator import Speculator

__all__ = ["Speculator"]
