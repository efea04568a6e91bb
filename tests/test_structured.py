"""Structured output in the engine: outputs match their schema, regex or choice, with speculation too (and
greedy outputs equal to speculation off); grammars compile while the request waits in the queue, never in a
step; drafts the grammar refuses are rejected and the matcher rolls back with them."""

from __future__ import annotations

import json
import random
import re
from concurrent.futures import Future

import jsonschema
import pytest
import torch

from scheduler import LLM, SamplingParams, StructuredOutputsParams
from scheduler.structured.compiler import check_grammar
from tests.helpers import assert_pool_idle

MAX_TOKENS = 64
WORDS = ["name", "city", "color", "size", "score", "tags", "owner", "active", "level", "kind", "items", "id"]


def make_schema(rng: random.Random, depth: int = 0) -> dict:
    """A small object schema: integers with bounds, booleans, enums, short strings, arrays, nested objects."""
    keys = rng.sample(WORDS, rng.randint(2, 3))
    properties = {}
    for key in keys:
        pick = rng.choice(["integer", "boolean", "enum", "string", "array"] + (["object"] if depth < 1 else []))
        if pick == "integer":
            properties[key] = {"type": "integer", "minimum": 0, "maximum": rng.choice([9, 99, 1000])}
        elif pick == "boolean":
            properties[key] = {"type": "boolean"}
        elif pick == "enum":
            properties[key] = {"enum": rng.sample(["red", "green", "blue", "small", "large", "yes", "no"], 3)}
        elif pick == "string":
            properties[key] = {"type": "string", "maxLength": rng.choice([4, 8, 12])}
        elif pick == "array":
            item = rng.choice([{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["a", "b", "c"]}])
            properties[key] = {"type": "array", "items": item, "minItems": 1, "maxItems": 3}
        else:
            properties[key] = make_schema(rng, depth + 1)
    required = rng.sample(keys, rng.randint(1, len(keys)))
    return {"type": "object", "properties": properties, "required": required}


SCHEMAS = [make_schema(random.Random(seed)) for seed in range(20)]
REGEXES = [r"[a-z]{1,12} [0-9]{2}", r"(cat|dog)s? are (great|fine)\.", r"[A-Z][a-z]{2,6}, [0-9]{4}", r"0x[0-9a-f]{4}"]
CHOICES = [["yes", "no"], ["red", "green", "blue"], ["Paris", "London", "Rome", "New York"], ["1", "2", "3"]]


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def cases(temperature: float = 0.0) -> list[tuple[list[dict], SamplingParams]]:
    def params(**so):
        return SamplingParams(temperature=temperature, seed=7 if temperature else None, max_tokens=MAX_TOKENS,
                              structured_outputs=StructuredOutputsParams(**so))

    out = [(chat(f"Reply in JSON with the fields {', '.join(s['properties'])}."), params(json=s)) for s in SCHEMAS]
    out += [(chat("Write a short line."), params(regex=r)) for r in REGEXES]
    out += [(chat(f"Pick one: {', '.join(c)}."), params(choice=c)) for c in CHOICES]
    out += [(chat('Give a tiny JSON object, like {"a": 1}.'), params(json_object=True))]
    return out


def assert_valid(outputs, cases_) -> None:
    for out, (_, params) in zip(outputs, cases_):
        so = params.structured_outputs
        assert out.finish_reason == "stop", (out.text, so)
        if so.json is not None:
            jsonschema.validate(json.loads(out.text), json.loads(so.json))
        elif so.json_object:
            assert isinstance(json.loads(out.text), dict)
        elif so.regex is not None:
            assert re.fullmatch(so.regex, out.text), (out.text, so.regex)
        else:
            assert out.text in so.choice


ENGINES = {"off": {}, "ngram": dict(speculative="ngram"), "draft": dict(speculative="draft")}


@pytest.fixture(scope="module")
def llms():
    made = {}

    def get(mode: str) -> LLM:
        if mode not in made:
            made[mode] = LLM("default", dtype="float32", max_num_batched_tokens=512, num_speculative_tokens=2,
                             adaptive_speculation=False, **ENGINES[mode])
        return made[mode]

    return get


@pytest.fixture(scope="module")
def greedy_off(llms):
    c = cases()
    return llms("off").chat([m for m, _ in c], [p for _, p in c])


def test_greedy_outputs_match_their_schema_regex_or_choice(greedy_off):
    assert_valid(greedy_off, cases())


@pytest.mark.parametrize("mode", ["ngram", "draft"])
def test_with_speculation_outputs_stay_valid_and_greedy_ones_unchanged(llms, greedy_off, mode):
    c = cases()
    llm = llms(mode)
    outputs = llm.chat([m for m, _ in c], [p for _, p in c])
    assert [o.token_ids for o in outputs] == [o.token_ids for o in greedy_off]
    assert sum(o.metrics.draft_tokens for o in outputs) > 0
    assert_pool_idle(llm.engine)


@pytest.mark.parametrize("mode", ["off", "ngram", "draft"])
def test_sampled_outputs_are_valid_with_and_without_speculation(llms, mode):
    # Not json_object: any JSON, with any whitespace, need not close within MAX_TOKENS when sampled.
    c = cases(temperature=0.7)[:-1][::4]
    assert_valid(llms(mode).chat([m for m, _ in c], [p for _, p in c]), c)


def test_a_request_waits_in_the_queue_while_its_grammar_compiles(llms):
    engine = llms("off").engine
    real = engine.grammars.submit
    pending: Future = Future()
    engine.grammars.submit = lambda so: pending
    try:
        so = StructuredOutputsParams(choice=["alpha", "beta"])
        stream = engine.add_request("Pick one.", SamplingParams(temperature=0, max_tokens=8, structured_outputs=so))
        for _ in range(3):
            engine.step()
            assert engine.num_running == 0 and not engine.scheduler.waiting and engine.num_waiting == 1
        pending.set_result(real(so).result())
        while not stream.finished:
            engine.step()
    finally:
        engine.grammars.submit = real
    text = ""
    while (delta := stream.get_nowait()) is not None:
        text += delta.text
    assert text in ("alpha", "beta")


def test_a_grammar_that_fails_to_compile_ends_the_request_with_an_error_naming_the_field(llms):
    engine = llms("off").engine
    real = engine.grammars.submit
    failed: Future = Future()
    failed.set_exception(RuntimeError("out of memory"))
    engine.grammars.submit = lambda so: failed
    try:
        stream = engine.add_request("Hi", SamplingParams(structured_outputs=StructuredOutputsParams(regex="a+")))
        while not stream.finished:
            engine.step()
    finally:
        engine.grammars.submit = real
    last = [d for d in iter(stream.get_nowait, None)][-1]
    assert last.finished and last.error == "structured_outputs.regex: out of memory"
    assert_pool_idle(engine)


def test_drafts_the_grammar_refuses_are_masked_and_rolled_back(llms):
    """Masks for drafts walk the matcher; settling on fewer accepted drafts leaves it where a matcher fed
    only the kept tokens would be."""
    from scheduler.structured.guide import Guide, TokenMasks

    engine = llms("off").engine
    tokenizer = engine.tokenizer
    compiled = engine.grammars.submit(StructuredOutputsParams(regex=r"ab(c|d)+")).result()
    a, b, c, z = (tokenizer.convert_tokens_to_ids(t) for t in "abcz")
    guide, masks = Guide(compiled), TokenMasks(engine.vocab_size, torch.device("cpu"))
    host = masks.rows(5)
    walked = guide.fill_drafts([a, b, z, c], host, 0)
    assert walked == 2  # z is refused, so c after it is never walked

    def allowed(bitmask, row, token):
        return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)

    assert allowed(host, 1, b) and not allowed(host, 2, z)  # z's position refuses it: verification rejects it
    guide.settle(walked, 1, b)  # the target kept a, then chose b itself
    fresh = Guide(compiled)
    fresh.accept([a, b])
    mine, theirs = (torch.full((1, masks.width), -1, dtype=torch.int32) for _ in range(2))
    guide.fill(mine, 0)
    fresh.fill(theirs, 0)
    assert torch.equal(mine, theirs) and guide.num_accepted == 2 and allowed(mine, 0, c)


BAD = [
    (dict(json="{not json"), "structured_outputs.json"),
    (dict(json='{"type": "frog"}'), "structured_outputs.json"),
    (dict(json="[1, 2]"), "structured_outputs.json"),
    (dict(regex="(a"), "structured_outputs.regex"),
    (dict(regex=""), "structured_outputs.regex"),
    (dict(choice=[]), "structured_outputs.choice"),
    (dict(choice=["a", ""]), "structured_outputs.choice"),
    (dict(grammar="root ::= missing"), "structured_outputs.grammar"),
    (dict(json_object="yes"), "structured_outputs.json_object"),
    (dict(), "structured_outputs"),
    (dict(regex="a", choice=["a"]), "structured_outputs"),
]


@pytest.mark.parametrize("fields, named", BAD, ids=[str(f) for f, _ in BAD])
def test_bad_constraints_are_refused_naming_the_field(fields, named):
    with pytest.raises(ValueError, match=f"^{re.escape(named)}: "):
        check_grammar(StructuredOutputsParams(**fields))


def test_a_completed_grammar_stops_the_request_even_with_ignore_eos(llms):
    so = StructuredOutputsParams(choice=["yes", "no"])
    (out,) = llms("off").chat([chat("Yes or no?")], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                                   structured_outputs=so))
    assert out.finish_reason == "stop" and out.text in ("yes", "no")
