"""Structured output in the engine: outputs match their schema, regex, choice or structural tag, with speculation
too (and greedy outputs equal to speculation off), and with overlapped steps as without; grammars compile while
the request waits in the queue, never in a step; drafts the grammar refuses are rejected and the matcher rolls
back with them; greedy rows under a grammar take the sampler's tokens without it."""

from __future__ import annotations

import dataclasses
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
TAG_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}
# A structural tag in both forms: the whole output one tagged part, and (the older form, what tool calling sends)
# free text in which each trigger opens a tagged part held to its schema.
ANSWER_TAG = {"type": "structural_tag", "format": {"type": "tag", "begin": "<answer>", "end": "</answer>",
                                                   "content": {"type": "json_schema", "json_schema": TAG_SCHEMA}}}
TOOL_TAGS = {"structures": [{"begin": "<tool=weather>", "schema": TAG_SCHEMA, "end": "</tool>"}],
             "triggers": ["<tool="]}


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def cases(temperature: float = 0.0) -> list[tuple[list[dict], SamplingParams]]:
    def params(**so):
        return SamplingParams(temperature=temperature, seed=7 if temperature else None, max_tokens=MAX_TOKENS,
                              structured_outputs=StructuredOutputsParams(**so))

    out = [(chat(f"Reply in JSON with the fields {', '.join(s['properties'])}."), params(json=s)) for s in SCHEMAS]
    out += [(chat("Write a short line."), params(regex=r)) for r in REGEXES]
    out += [(chat(f"Pick one: {', '.join(c)}."), params(choice=c)) for c in CHOICES]
    out += [(chat("Which city is the Eiffel tower in? Answer in JSON."), params(structural_tag=tag))
            for tag in (ANSWER_TAG, TOOL_TAGS)]
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
        elif so.structural_tag is not None:
            assert_tagged(out.text, json.loads(so.structural_tag))
        else:
            assert out.text in so.choice


def assert_tagged(text: str, tag: dict) -> None:
    """The text holds what the structural tag asks: each tagged part's content valid against its schema."""
    if "structures" in tag:  # free text; every trigger opens a whole tagged part
        (part,), (trigger,) = tag["structures"], tag["triggers"]
        contents = re.findall(f"{re.escape(part['begin'])}(.*?){re.escape(part['end'])}", text, re.S)
        assert text.count(trigger) == len(contents), text
        schema = part["schema"]
    else:
        form = tag["format"]
        assert text.startswith(form["begin"]) and text.endswith(form["end"]), text
        contents, schema = [text[len(form["begin"]):-len(form["end"])]], form["content"]["json_schema"]
    for content in contents:
        jsonschema.validate(json.loads(content), schema)


ENGINES = {"off": {}, "ngram": dict(speculative="ngram"), "draft": dict(speculative="draft"),
           "sync": dict(overlap_scheduling=False)}


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


def test_overlapped_steps_give_the_synchronous_loops_outputs(llms, greedy_off):
    """The masks of a launched step are filled once the host has read the tokens in flight: greedy, sampled
    and logprob-carrying constrained requests, grammars completing mid-batch among them, get what the
    synchronous loop gives them, and their steps overlap."""
    overlapped, sync = llms("off"), llms("sync")
    c = cases()
    assert [o.token_ids for o in sync.chat([m for m, _ in c], [p for _, p in c])] == \
        [o.token_ids for o in greedy_off]
    mixed = cases()[::3] + cases(temperature=0.7)[:-1][::4]
    mixed += [(m, dataclasses.replace(p, logprobs=2)) for m, p in cases()[2::6]]
    before = overlapped.engine.num_overlapped_steps
    outputs = overlapped.chat([m for m, _ in mixed], [p for _, p in mixed])
    assert overlapped.engine.num_overlapped_steps > before and sync.engine.num_overlapped_steps == 0
    reference = sync.chat([m for m, _ in mixed], [p for _, p in mixed])
    assert [o.token_ids for o in outputs] == [o.token_ids for o in reference]
    # A launched step also computes the rows of requests that ended in the step before: the batches differ
    # in shape, so the logits in their last bits.
    for out, ref in zip(outputs, reference):
        assert (out.logprobs is None) == (ref.logprobs is None)
        for mine, theirs in zip(out.logprobs or [], ref.logprobs or []):
            assert [t for t, _ in mine.top] == [t for t, _ in theirs.top]
            assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)
    assert_valid(outputs, mixed)
    assert_pool_idle(overlapped.engine)


def test_greedy_rows_under_a_grammar_take_the_samplers_tokens(llms):
    """TokenMasks.argmax (greedy rows, no sampling rows) picks what the sampler picks from the same masks, for
    rows constrained at different points of their grammars and rows without one; the masks change some picks."""
    from scheduler.sampling.batch import SamplingBatch
    from scheduler.sampling.sampler import Sampler
    from scheduler.structured.guide import Guide, TokenMasks

    engine = llms("off").engine
    tokenizer, vocab_size, cpu = engine.tokenizer, engine.vocab_size, torch.device("cpu")
    prefixes = [(StructuredOutputsParams(json=s), '{"' if i % 2 else "") for i, s in enumerate(SCHEMAS[:6])]
    prefixes += [(StructuredOutputsParams(regex=REGEXES[0]), "abc"),
                 (StructuredOutputsParams(choice=CHOICES[2]), "Par")]
    guides = []
    for so, prefix in prefixes:
        guide = Guide(engine.grammars.submit(so).result())
        guide.accept(tokenizer.encode(prefix))
        assert guide.end is None
        guides += [guide, None]
    masks = TokenMasks(vocab_size, cpu)
    logits = torch.randn(len(guides), vocab_size, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0)] * len(guides)
    batch = SamplingBatch.build(params, [[]] * len(guides), [[]] * len(guides), [None] * len(guides),
                                [[]] * len(guides), vocab_size, cpu)
    batch.token_bitmask = masks.for_requests(guides).clone()
    sampled = Sampler()(logits.clone(), batch).token_ids
    picked = masks.argmax(logits.clone(), guides)
    assert torch.equal(picked, sampled)
    assert torch.equal(picked[1::2], logits[1::2].argmax(dim=-1))  # rows without a grammar
    assert not torch.equal(picked[::2], logits[::2].argmax(dim=-1))


def test_masks_on_the_cpu_are_xgrammars(llms):
    """The CPU's bulk unpacking of the bits masks exactly what xgrammar's own kernel masks, past the last
    full word of the vocabulary too."""
    import xgrammar as xgr

    from scheduler.structured.guide import apply_token_bitmask

    gen = torch.Generator().manual_seed(1)
    for vocab_size in (64, 1000, 49152):
        width = (vocab_size + 31) // 32
        bitmask = torch.randint(-2**31, 2**31 - 1, (5, width), dtype=torch.int32, generator=gen)
        bitmask[0] = -1
        bitmask[1] = 0
        logits = torch.randn(5, vocab_size, generator=gen)
        mine, theirs = logits.clone(), logits.clone()
        apply_token_bitmask(mine, bitmask)
        xgr.apply_token_bitmask_inplace(theirs, bitmask, vocab_size=vocab_size, backend="cpu")
        assert torch.equal(mine, theirs) and torch.equal(mine[0], logits[0]) and mine[1].isinf().all()


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
    from scheduler.structured.guide import Guide, TokenMasks, settle_drafts

    engine = llms("off").engine
    tokenizer = engine.tokenizer
    compiled = engine.grammars.submit(StructuredOutputsParams(regex=r"ab(c|d)+")).result()
    a, b, c, z = (tokenizer.convert_tokens_to_ids(t) for t in "abcz")
    guide, masks = Guide(compiled), TokenMasks(engine.vocab_size, torch.device("cpu"))
    drafts = [[a, b, z, c], [c], [a]]  # beside rows without a grammar, and a guide that has ended
    ended = Guide(compiled)
    ended.accept([z])
    host, walked = masks.fill_drafts([guide, None, ended], drafts)
    assert walked == [2, 0, 0]  # z is refused, so c after it is never walked

    def allowed(bitmask, row, token):
        return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)

    assert allowed(host, 1, b) and not allowed(host, 2, z)  # z's position refuses it: verification rejects it
    assert (host[3:] == -1).all()  # never reached, no grammar, an ended grammar: everything allowed
    settle_drafts([guide, None, ended], drafts, walked, [1, 0, 0], [b, c, a], host)  # kept a, then chose b
    assert guide.rollback == 1 and guide.pending == [b]  # both reach the matcher with the next fill
    fresh = Guide(compiled)
    fresh.accept([a, b])
    mine, theirs = (torch.full((1, masks.width), -1, dtype=torch.int32) for _ in range(2))
    guide.fill(mine, 0)
    fresh.fill(theirs, 0)
    assert torch.equal(mine, theirs) and guide.num_accepted == 2 and allowed(mine, 0, c)


def test_a_structural_tag_lets_text_run_free_until_a_trigger_then_holds_the_part_to_its_schema(llms):
    from scheduler.structured.guide import Guide

    engine = llms("off").engine
    compiled = engine.grammars.submit(StructuredOutputsParams(structural_tag=TOOL_TAGS)).result()

    def refused_at(text: str) -> int | None:
        guide = Guide(compiled)
        guide.accept(engine.tokenizer.encode(text, add_special_tokens=False))
        return guide.end

    assert refused_at('Let me look. <tool=weather>{"city": "Paris"}</tool> It is sunny.') is None
    assert refused_at('<tool=weather>{"city": "Paris"}') is None  # a part begun, not ended yet
    assert refused_at('<tool=weather>{"town": "Paris"}') is not None  # not its schema
    assert refused_at("<tool=rain>{}") is not None  # a trigger no tag begins with


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
    (dict(structural_tag="[1]"), "structured_outputs.structural_tag"),
    (dict(structural_tag={"type": "structural_tag", "format": {"type": "frog"}}), "structured_outputs.structural_tag"),
    (dict(structural_tag={"structures": [{"begin": "<a>", "end": "</a>"}], "triggers": ["<a"]}),
     "structured_outputs.structural_tag"),
    (dict(structural_tag={"structures": [], "triggers": []}), "structured_outputs.structural_tag"),
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


def test_the_structured_benchmark_reports_every_workload_with_speculation(tiny_text_model_dir, tmp_path):
    from bench import structured

    path, _ = tiny_text_model_dir
    out = tmp_path / "structured.json"
    structured.main(["--model", str(path), "--num-requests", "3", "--output-len", "6", "--speculative", "ngram",
                     "--no-adaptive-speculation", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["speculative"] == "ngram" and set(report["results"]) == {
        "unconstrained_greedy", "unconstrained_sampled", "json_schema_greedy"}
    for result in report["results"].values():
        assert result["output_tokens"] == 3 * 6  # no JSON array of 6 objects closes within 6 tokens
        assert result["ms_per_output_token"] > 0 and result["draft_tokens"] >= result["accepted_draft_tokens"] >= 0
    assert "| drafts accepted/made |" in out.with_suffix(".md").read_text()
