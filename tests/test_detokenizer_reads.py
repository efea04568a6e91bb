"""Text made at the reader's cadence (scheduler/io/stream_text.py): a request without stop strings gets its text from
the tokens each read takes at once, one window decode a read. Whatever the reads, the text is what the engine makes
token by token: the deltas concatenate to tokenizer.decode of the output (the prompt's last tokens as context), a
character cut at the end of a read waits for the next (no delta carries a cut character's U+FFFD), and the last
read leaves out the bytes of a character never finished, counted in held_back_bytes."""

from __future__ import annotations

import random

import pytest

from scheduler.core.outputs import RequestOutput
from scheduler.core.params import SamplingParams
from scheduler.io.detokenizer import IncrementalDetokenizer
from scheduler.io.stream_text import StreamText
from tests.test_detokenizer import (
    PROMPT,
    TEXTS,
    PythonDecode,
    bytes_of,
    encode,
    output_text,
    sentencepiece_style_tokenizer,
    smollm2_tokenizer,
    text_pieces,
)


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


@pytest.fixture(scope="module", params=["default", "sentencepiece"])
def any_tok(request, tok):
    return tok if request.param == "default" else sentencepiece_style_tokenizer()


def reads(tokenizer, prompt_ids: list[int], ids: list[int], sizes: list[int], params: SamplingParams,
          table_of=None) -> tuple[list[str], int]:
    """(text of each read, held_back_bytes) of a reader taking `sizes` tokens a read (the rest in the last)."""
    text = StreamText(tokenizer, prompt_ids, params, bytes_of(table_of or tokenizer))
    deltas, start, n = [], 0, 0
    while start < len(ids):
        size = sizes[n] if n < len(sizes) else len(ids)
        end, n = min(len(ids), start + size), n + 1
        out = text.fill(RequestOutput("r", ids[start:end], "", num_output_tokens=end, finished=end == len(ids)))
        deltas.append(out.text)
        start = end
    return deltas, out.held_back_bytes


def token_by_token(tokenizer, prompt_ids: list[int], ids: list[int], params: SamplingParams) -> tuple[str, int]:
    """The engine's text of the same output, one token a step."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, params, bytes_of(tokenizer))
    for n, token in enumerate(ids, start=1):
        detok.add_tokens([token], n)
    return detok.output_text + detok.take_delta(finished=True)[len(detok.output_text):], detok.held_back_bytes


def assert_streamed(deltas: list[str], final: str) -> None:
    streamed = ""
    for delta in deltas:
        streamed += delta
        assert final.startswith(streamed), "a delta carried text the final text does not have (a cut character?)"
    assert streamed == final


@pytest.mark.parametrize("size", [2, 3, 5, 16, 1000])
@pytest.mark.parametrize("text", TEXTS)
def test_reads_of_several_tokens_concatenate_to_the_full_decode(any_tok, text, size):
    prompt_ids, ids = encode(any_tok, PROMPT), encode(any_tok, text)
    deltas, held_back = reads(any_tok, prompt_ids, ids, [size] * len(ids), SamplingParams())
    assert_streamed(deltas, output_text(any_tok, prompt_ids, ids, skip_special_tokens=True))
    assert held_back == 0 and not any("\ufffd" in d for d in deltas)


def test_an_emoji_split_across_reads_waits_for_its_last_byte(tok):
    ids = encode(tok, "ok 😀👍🏽 done")
    pieces = [tok.decode([i]) for i in ids]
    assert any(p.endswith("\ufffd") for p in pieces), "no token splits an emoji"
    for cut in range(1, len(ids)):  # every cut point, two reads
        deltas, held_back = reads(tok, encode(tok, PROMPT), ids, [cut], SamplingParams())
        assert_streamed(deltas, "ok 😀👍🏽 done")
        assert held_back == 0 and not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("size", [2, 7])
@pytest.mark.parametrize("text", ["ok 😀 é€ 日本 👍🏽!", "\ufffd and é\ufffd😀"])
def test_an_output_cut_inside_a_character_holds_its_bytes_back(any_tok, text, size):
    ids = encode(any_tok, text)
    table = bytes_of(any_tok).of(ids, skip_special_tokens=True)
    for cut in range(1, len(ids) + 1):
        data = b"".join(table[:cut])
        whole = data.decode("utf-8", "ignore")
        deltas, held_back = reads(any_tok, encode(any_tok, PROMPT), ids[:cut], [size] * cut, SamplingParams())
        assert_streamed(deltas, whole)
        assert held_back == len(data) - len(whole.encode())


def test_random_reads_of_random_tokens_match_the_engines_token_by_token_text(any_tok):
    # Random ids split characters anywhere, leave bytes unpaired and put special tokens in the middle.
    rng = random.Random(2)
    pool = sorted({t for piece in text_pieces(any_tok) for t in piece} | set(any_tok.all_special_ids))
    lone_bytes = [t for t in pool if any_tok.decode([t]) == "\ufffd"]
    for _ in range(200):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 40))]
        if rng.random() < 0.2:  # past MAX_PENDING_TOKENS at times
            ids[rng.randrange(len(ids)):] = [rng.choice(lone_bytes)] * rng.randint(10, 20)
        prompt_ids = [rng.choice(pool) for _ in range(rng.randint(1, 8))]
        params = SamplingParams(skip_special_tokens=rng.random() < 0.5)
        sizes = [rng.choice([1, 2, 3, 5, 8, 20]) for _ in ids]
        deltas, held_back = reads(any_tok, prompt_ids, ids, sizes, params)
        final, engine_held_back = token_by_token(any_tok, prompt_ids, ids, params)
        assert_streamed(deltas, final)
        assert held_back == engine_held_back
        assert reads(PythonDecode(any_tok), prompt_ids, ids, sizes, params, table_of=any_tok) == (deltas, held_back)


class CountingDecode(PythonDecode):
    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.calls = 0

    def decode(self, ids, **kwargs):
        self.calls += 1
        return super().decode(ids, **kwargs)


def test_a_read_on_whole_characters_costs_one_window_decode(tok):
    ids = encode(tok, TEXTS[0] * 4)
    counting = CountingDecode(tok)
    deltas, _ = reads(counting, encode(tok, PROMPT), ids, [8] * len(ids), SamplingParams(), table_of=tok)
    num_reads = len(deltas)
    # One for the window a read, one for the context's text the first time the window slides.
    assert counting.calls <= 2 * num_reads and counting.calls < len(ids) / 2, (counting.calls, num_reads, len(ids))


def test_a_consumer_that_falls_behind_gets_the_engines_text_in_one_read(tiny_text_model_dir):
    """The daemon's thread mode: a call that takes nothing until its request has finished in the engine reads every
    token after its first read at once, and its text, made on the event loop, is the engine's own (made token by
    token)."""
    import asyncio

    from scheduler import Engine
    from server.async_engine import AsyncEngine

    engine = Engine(model=str(tiny_text_model_dir[0]))
    prompt = engine.tokenizer.encode("Emoji 😀, 日本語 and café:")
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    engine.add_request(None, params, request_id="engine-made", prompt_token_ids=prompt, detokenize=True)
    made = []
    while engine.has_unfinished():
        made += engine.step()
    served = AsyncEngine(engine)

    async def read_late() -> list[RequestOutput]:
        outputs = served.generate(prompt, params, "read-late")
        first = await anext(outputs)
        while engine.has_unfinished():
            await asyncio.sleep(0.01)
        return [first] + [output async for output in outputs]

    served.start()
    try:
        outputs = asyncio.run(read_late())
    finally:
        served.stop()
    # The first read takes what waited when the call first looked (one token, or a few on a busy machine); the
    # second, everything else at once.
    assert len(outputs) == 2 and sum(len(o.token_ids) for o in outputs) == 30 and len(outputs[1].token_ids) > 1
    assert "".join(o.text for o in outputs) == "".join(o.text for o in made) and made[-1].finished
    assert outputs[-1].held_back_bytes == made[-1].held_back_bytes
