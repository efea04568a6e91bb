"""The garbage collector kept off the step loop."""

from __future__ import annotations

import gc

GC_OBJECTS_PER_SEQUENCE = 16  # young objects a step may hold per running sequence before the collector runs


def tune_gc(max_num_seqs: int) -> None:
    """Keep the garbage collector off the step loop. What start-up made (modules, model, block pool) is frozen out of
    later collections, a process's earlier engine unfrozen and collected first (its cycles must not stay frozen).
    Young collections start past what a step holds alive at once (a few objects a row): at the default 700, ~11 ran
    each step at 1024 sequences, promoting the step's objects until a full collection, walking every token list
    (~200 ms), came every ~13 steps."""
    if gc.get_freeze_count():
        gc.unfreeze()
    gc.collect()
    gc.freeze()
    threshold, *older = gc.get_threshold()
    gc.set_threshold(max(threshold, GC_OBJECTS_PER_SEQUENCE * max_num_seqs), *older)
