"""Steps under grammars: the masks, filled in one call on the helper thread, are what each matcher fills alone;
rows without a live grammar allow everything however the reused buffer was filled before; tokens judged by
their mask bits reach the matcher with the next fill, ending the guide as the matcher would; the masked argmax
picks what xgrammar's own masking picks; launched steps, whose tokens are drawn once the masks are filled, keep
every answer through preemption, n > 1 and aborts, and give every block back."""

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


def test_tokens_judged_by_their_mask_bits_reach_the_matcher_with_the_next_fill(compiled):
    _, regex, choice = compiled
    masks = TokenMasks(len(VOCAB), CPU)
    lazy, eager = Guide(regex), Guide(regex)
    for token in encode("dogs 42"):
        masks.fill([lazy])
        lazy.accept([token])
        eager.accept([token])
        assert lazy.pending == [token] and lazy.end is None and lazy.num_accepted == eager.num_accepted
    assert torch.equal(masks.fill([lazy]), one_by_one([eager], masks.width)) and lazy.pending == []
    stop = VOCAB.index("</s>")
    lazy.accept([stop])
    eager.accept([stop])
    assert lazy.complete and eager.complete and lazy.end == eager.end == len("dogs 42") + 1
    refusing = Guide(choice)
    masks.fill([refusing])
    refusing.accept(encode("x"))  # its bit is not set: the guide ends, the matcher never sees it
    assert refusing.end == 0 and not refusing.complete and refusing.pending == []


def test_constrained_requests_preempted_or_aborted_keep_their_answers_and_give_every_block_back(tiny_text_model_dir):
    """Launched steps draw their tokens once the masks are filled: requests under grammars, n > 1 among them,
    preempted for want of blocks or aborted mid-way, answer as each does alone, and no block is kept."""
    from scheduler import LLM, SamplingParams, StructuredOutputsParams
    from tests.helpers import assert_pool_idle

    block_bytes = 2 * 2 * 2 * 16 * 4 * 16  # layers x (k, v) x kv heads x head dim x fp32 x tokens
    llm = LLM(str(tiny_text_model_dir[0]), max_num_batched_tokens=128, kv_cache_bytes=20 * block_bytes)
    engine = llm.engine
    prompts = [list(range(300 + 7 * i, 365 + 7 * i)) for i in range(5)]  # 65 tokens: five blocks each
    params = [SamplingParams(temperature=0, max_tokens=40, n=2 if i == 0 else 1,
                             structured_outputs=StructuredOutputsParams(regex=r"[a-z]{4,9}( [a-z]{2,9}){6,12}\."))
              for i in range(len(prompts))]
    alone = [llm.generate([p], q)[0] for p, q in zip(prompts, params)]
    overlapped = engine.num_overlapped_steps
    together = llm.generate(prompts, params)
    assert engine.num_overlapped_steps > overlapped
    assert sum(c.metrics.preemptions for r in together for c in r.outputs) > 0  # 20 blocks hold fewer than all
    assert [[c.token_ids for c in r.outputs] for r in together] == [[c.token_ids for c in r.outputs] for r in alone]
    assert all(c.finish_reason == "stop" for r in together for c in r.outputs)

    streams = [engine.add_request(None, q, prompt_token_ids=p) for p, q in zip(prompts, params)]  # n = 2 first
    for _ in range(6):
        engine.step()
    for stream in streams[1::2]:
        assert engine.abort(stream.request_id)
    while engine.has_unfinished():
        engine.step()
    for i, stream in enumerate(streams):
        deltas = list(iter(stream.get_nowait, None))
        for index, completion in enumerate(alone[i].outputs):
            mine = [d for d in deltas if d.index == index]
            assert mine[-1].finished and mine[-1].finish_reason == ("abort" if i % 2 else "stop")
            tokens = [t for d in mine for t in d.token_ids]
            assert tokens == completion.token_ids if i % 2 == 0 else completion.token_ids[:len(tokens)] == tokens
    assert_pool_idle(engine)


def walked_alone(guide: Guide | None, drafts: list[int], width: int) -> tuple[torch.Tensor, int]:
    """What a request's verified positions allow, from a copy of its matcher walked through its drafts alone."""
    rows = torch.full((1 + len(drafts), width), -1, dtype=torch.int32)
    if guide is None or guide.end is not None:
        return rows, 0
    guide.flush()
    matcher = guide.matcher.fork()
    for i, token in enumerate([None] + drafts):
        if token is not None and not matcher.accept_token(token):
            return rows, i - 1
        if matcher.is_terminated():
            return rows, i
        matcher.fill_next_token_bitmask(rows, i)
    return rows, len(drafts)


def test_draft_masks_filled_depth_by_depth_are_each_matchers_own_walk(compiled):
    """Drafts of several lengths, some refused part-way, one ending in the stop token, rows without a grammar and
    an ended guide: each request's rows are what its matcher walked alone gives, and so is how far it walked."""
    guides = guides_at_several_points(compiled)
    stop = VOCAB.index("</s>")
    drafts = [encode('ris", "size": 12}') + [stop], [], encode("2"), [], [stop], [],
              encode('{"town"'), encode("ab"), encode("dog 1"), [], encode("x")]
    masks = TokenMasks(len(VOCAB), CPU)
    alone = [walked_alone(guide, d, masks.width) for guide, d in zip(guides, drafts)]
    host, walked = masks.fill_drafts_later(guides, drafts).result()
    assert torch.equal(host, torch.cat([rows for rows, _ in alone])) and walked == [w for _, w in alone]
    assert walked[0] == len(drafts[0]) and 0 < walked[6] < len(drafts[6]) and walked[-1] == 0


def test_a_matcher_that_fails_fails_its_own_guide_and_row_alone(compiled):
    """A matcher that raises (terminated behind its guide's back, so it has no next mask) fails the batch call:
    the rows are filled one by one, the failing guide's row allows everything and its guide says why."""
    from scheduler.structured.guide import GrammarFailure

    guides = guides_at_several_points(compiled)
    broken = Guide(compiled[2])
    broken.accept(encode("yes"))
    assert broken.matcher.accept_token(VOCAB.index("</s>")) and broken.end is None
    masks = TokenMasks(len(VOCAB), CPU)
    expected = one_by_one(guides, masks.width)
    host = masks.fill(guides + [broken])
    assert torch.equal(host[:-1], expected) and (host[-1] == -1).all()
    assert broken.ended and broken.end is None and broken.mask is None and "failed to fill its mask" in broken.error
    with pytest.raises(GrammarFailure, match="structured_outputs: the grammar failed to fill its mask"):
        broken.check()
    guides[0].check()  # the others go on
