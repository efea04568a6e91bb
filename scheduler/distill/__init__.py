"""Draft distillation: a small draft model made from its target, trained on the target's own
answers to agree with it, saved whole or in a compact form that borrows the target's embeddings.

    beastserve distill-draft --target MODEL --out DIR      (or: python -m scheduler.distill ...)
"""
