"""A step's grammar masks: filled in one call on the helper thread, they are what each matcher fills alone; rows
without a live grammar allow everything however the reused buffer was filled before; a launched step's tokens
are drawn only once its masks are filled, and the masked argmax picks what xgrammar's own masking picks."""

from __future__ import annotations

import pytest
import torch

from scheduler.structured.guide import Guide, TokenMasks, masked_argmax

CPU = torch.device("cpu")


# A vocabulary of single characters, some words and a stop token: xgrammar's own tokenizer info, no model's.
VOCAB = [chr(c) for c in range(32, 127)] + ["cat", "dog", '{"', '":', "yes", "</s>"]


def encode(text: str) -> list[int]:
    return [VOCAB.index(c) for c in text]


@pytest.fixture(scope="module")
def compiled():
    import xgrammar as xgr

    info = xgr.TokenizerInfo(VOCAB, stop_token_ids=[VOCAB.index("</s>")])
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    schema = '{"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "size": ' \
             '{"type": "integer"}}, "required": ["city", "size"]}'
    return [compiler.compile_json_schema(schema, any_whitespace=False), compiler.compile_regex(r"(cat|dog)s? [0-9]{2}"),
            compiler.compile_grammar('root ::= "yes" | "no"')]


def guides_at_several_points(grammars) -> list[Guide | None]:
    """Guides part-way through their grammars, an ended one, and rows without a grammar."""
    json, regex, choice = grammars
    guides = []
    for grammar, prefix in [(json, '{"city": "Pa'), (regex, "cats 4"), (choice, "ye"), (json, ""), (regex, "")]:
        guide = Guide(grammar)
        guide.accept(encode(prefix))
        assert guide.end is None
        guides += [guide, None]
    ended = Guide(grammars[2])
    ended.accept(encode("maybe"))  # refused: the guide ends
    assert ended.end is not None
    return guides + [ended]


def one_by_one(guides: list[Guide | None], width: int) -> torch.Tensor:
    expected = torch.full((len(guides), width), -1, dtype=torch.int32)
    for row, guide in enumerate(guides):
        if guide is not None:
            guide.fill(expected, row)
    return expected


def test_masks_filled_on_the_helper_thread_are_each_matchers_own(compiled):
    guides = guides_at_several_points(compiled)
    masks = TokenMasks(len(VOCAB), CPU)
    expected = one_by_one(guides, masks.width)
    masks.rows(len(guides)).zero_()  # a buffer left refusing everything: rows without a live grammar are reset
    assert torch.equal(masks.fill_later(guides).result(), expected)
    assert (expected[1::2] == -1).all() and (expected[0::2][:-1] != -1).any(dim=1).all()
    swapped = guides[1:] + guides[:1]  # the rows' owners change places: each row is filled or reset anew
    assert torch.equal(masks.fill(swapped), one_by_one(swapped, masks.width))


def test_the_masked_argmax_picks_what_xgrammars_masking_picks(compiled):
    import xgrammar as xgr

    guides = guides_at_several_points(compiled)
    masks = TokenMasks(len(VOCAB), CPU)
    bitmask = masks.fill(guides).clone()
    bitmask[-1] = 0  # a row allowing nothing takes its first token, as with -inf
    logits = torch.randn(len(guides), len(VOCAB), generator=torch.Generator().manual_seed(0))
    theirs = logits.clone()
    xgr.apply_token_bitmask_inplace(theirs, bitmask, vocab_size=len(VOCAB), backend="cpu")
    picked = masked_argmax(logits.clone(), bitmask)
    assert torch.equal(picked, theirs.argmax(dim=-1)) and picked[-1] == 0
    assert torch.equal(picked[1:-1:2], logits[1:-1:2].argmax(dim=-1))  # rows without a grammar
