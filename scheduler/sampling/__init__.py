"""Sampling: parameters, per-step rows, the batched sampler."""
