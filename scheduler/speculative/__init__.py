"""Speculative decoding inside the batch step: proposers draft (proposer.py, registry.py), the
target verifies in the same forward pass as everything else, rejection sampling keeps the output
distribution exact (speculator.py, rejection.py)."""
