"""Paged attention backends. All take the same `AttentionMetadata`."""

from scheduler.worker.attention.metadata import AttentionMetadata
from scheduler.worker.attention.reference import paged_attention, write_kv

__all__ = ["AttentionMetadata", "paged_attention", "write_kv"]
