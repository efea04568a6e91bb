"""A grammar that fails fails its own request: a matcher made to refuse a token its mask allowed (the guide's fault
injection seam, Guide.refuse_at) ends that request with an error naming the cause and gives its blocks back, while
the other requests of the batch answer exactly as without the fault; the engine's shutdown leaves no grammar or
mask thread running; a schema nested as deep as is admitted does not hold back another client's stream."""

from __future__ import annotations

import json
import threading
import time

import pytest

from scheduler import LLM, SamplingParams, StructuredOutputsParams
from tests.helpers import assert_pool_idle

REGEX = r"(cat dog ){6,12}\."  # repetitive: n-gram drafts are kept


def structured_requests(count: int) -> tuple[list[list[int]], list[SamplingParams]]:
    prompts = [list(range(300 + 7 * i, 340 + 7 * i)) for i in range(count)]
    params = [SamplingParams(temperature=0, max_tokens=24, structured_outputs=StructuredOutputsParams(regex=REGEX))
              for _ in prompts]
    return prompts, params


LOOPS = {"overlapped": {}, "synchronous": dict(overlap_scheduling=False),
         "ngram": dict(speculative="ngram", num_speculative_tokens=2, adaptive_speculation=False)}


@pytest.mark.parametrize("loop", LOOPS)
def test_a_grammar_refusing_a_token_its_mask_allowed_fails_its_request_alone(tiny_text_model_dir, loop):
    llm = LLM(str(tiny_text_model_dir[0]), **LOOPS[loop])
    engine = llm.engine
    prompts, params = structured_requests(4)
    results = llm.generate(prompts, params)
    clean = [r.outputs[0].token_ids for r in results]
    assert all(len(tokens) > 6 for tokens in clean)
    if loop == "ngram":  # the grammars' masks were filled for drafted positions, some drafts kept
        assert sum(r.outputs[0].metrics.accepted_tokens for r in results) > 0

    streams = [engine.add_request(None, q, prompt_token_ids=p) for p, q in zip(prompts, params)]
    engine.step()  # the grammars are compiled already: every request has its guide now
    faulty = engine._groups[streams[1].request_id][0].request.guide
    faulty.refuse_at = 5
    while engine.has_unfinished():
        engine.step()
    for i, stream in enumerate(streams):
        deltas = list(iter(stream.get_nowait, None))
        tokens = [t for d in deltas for t in d.token_ids]
        last = deltas[-1]
        assert last.finished
        if i == 1:
            assert last.finish_reason == "abort" and "GrammarFailure" in last.error, last.error
            refused = int(last.error.split("the grammar refused token ")[1].split(",")[0])
            assert "which its mask allowed" in last.error and refused in clean[1][5:], last.error
            assert tokens == clean[1][:len(tokens)] and len(tokens) < len(clean[1])  # sent before the refusal
        else:
            assert last.error is None and tokens == clean[i]
            assert last.finish_reason == results[i].outputs[0].finish_reason
    assert faulty.error is not None
    assert_pool_idle(engine)
    engine.shutdown()


def test_shutdown_leaves_no_grammar_or_mask_thread_running(tiny_text_model_dir):
    before = set(threading.enumerate())
    llm = LLM(str(tiny_text_model_dir[0]))
    prompts, params = structured_requests(2)
    assert all(len(r.outputs[0].token_ids) > 6 for r in llm.generate(prompts, params))
    started = {t.name.split("_")[0] for t in set(threading.enumerate()) - before}
    assert {"grammar", "token-masks"} <= started, started  # both were at work
    llm.engine.shutdown()
    assert [t.name for t in set(threading.enumerate()) - before if t.is_alive()] == []


def nested_schema(depth: int) -> str:
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return json.dumps(schema)


def test_a_schema_as_deep_as_admitted_does_not_hold_back_another_clients_stream(tiny_text_daemon):
    """Four schemas 63 objects deep (nested 127 levels, the most admitted), each compiled anew, arrive while an
    unconstrained stream runs: no gap in that stream exceeds 1.5 s (0.2-0.4 s on this machine, also with two busy
    processes beside it), and each deep request gets its JSON while the stream runs."""
    from server.proto.beastserve.v1 import generate_pb2 as pb
    from server.proto.beastserve.v1 import generate_pb2_grpc as pb_grpc

    gaps, deep, ends = [], [], []
    with tiny_text_daemon.channel() as channel:
        stub = pb_grpc.GenerationStub(channel)

        def deep_request(i: int) -> None:
            schema = json.loads(nested_schema(63))
            schema["title"] = f"deep {i}"  # a distinct grammar each: every one compiled
            deep.append(stub.Generate(pb.GenerateRequest(
                text="Answer:", structured_outputs=pb.StructuredOutputs(json=json.dumps(schema)),
                stopping=pb.StoppingCriteria(max_tokens=48)), timeout=60))
            ends.append(time.monotonic())

        stream = stub.GenerateStream(pb.GenerateRequest(
            text="Count:", stopping=pb.StoppingCriteria(max_tokens=400, ignore_eos=True)), timeout=60)
        last, threads = time.monotonic(), []
        for n, _ in enumerate(stream):
            now = time.monotonic()
            gaps.append(now - last)
            last = now
            if n == 5:
                threads = [threading.Thread(target=deep_request, args=(i,)) for i in range(4)]
                for thread in threads:
                    thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert len(deep) == 4 and all(r.text.startswith('{"a":') and r.text.count('"a"') > 5 for r in deep), \
        [r.text[:40] for r in deep]
    assert max(ends) < last  # the deep requests were served while the stream ran
    assert len(gaps) > 20 and max(gaps[1:]) < 1.5, (len(gaps), sorted(gaps)[-3:])
