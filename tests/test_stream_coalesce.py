"""A stream whose consumer falls behind the engine gets every token produced since it last took one in one message,
and nothing is lost, reordered or misaligned. The inbox joins what waited (deterministic, on an event loop). On both
generation services, a client that reads nothing until its request has finished in the engine, then reads
everything, gets the unary call's answer with each token's logprob beside it, to the last message, in no more
messages than the stream interval allows (gRPC buffers a stalled client's first writes, so how many of the
messages join there depends on timing). With --stream-interval N, a client that keeps up gets the first token at
once, then at least N tokens a message but the last, and the same answer."""

from __future__ import annotations

import time

import pytest
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpb_grpc

from server.proto.beastserve.v1 import generate_pb2 as pb
from server.proto.beastserve.v1 import generate_pb2_grpc as pb_grpc
from tests.daemon import serve_for_module
from tests.slow_reader import SlowReader

MAX_TOKENS = 24
PROMPT = [5, 6, 7, 8, 9]
INTERVAL = 4


@pytest.fixture(scope="module")
def daemon(tiny_model_dir, tmp_path_factory):
    yield from serve_for_module(tiny_model_dir[0], tmp_path_factory, "--max-model-len", "256",
                                "--stream-interval", str(INTERVAL))


def _ours(request_id: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=request_id, token_ids=pb.TokenIds(ids=PROMPT),
                              sampling=pb.SamplingParams(temperature=0), output=pb.OutputOptions(logprobs=2),
                              stopping=pb.StoppingCriteria(max_tokens=MAX_TOKENS, ignore_eos=True))


def _theirs(request_id: str, stream: bool = True) -> vpb.GenerateRequest:
    return vpb.GenerateRequest(request_id=request_id, tokenized=vpb.TokenizedInput(input_ids=PROMPT), stream=stream,
                               sampling_params=vpb.SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                                  ignore_eos=True, logprobs=2))


def _held_then_read(daemon, path: str, request) -> list[bytes]:
    """The messages of a call whose client reads nothing until the engine has finished its request."""
    reader = SlowReader(daemon.address, window=16)  # the first message does not fit: the server's writes wait
    try:
        stream_id = reader.open_stream(path, request.SerializeToString())
        _wait_for(lambda: _finished_in_engine(daemon), "the request finished in the engine")
        reader.read_everything()
        _wait_for(lambda: stream_id in reader.ended, "the call's end")
        assert reader.ended[stream_id] == "trailers"
        return reader.messages(stream_id)
    finally:
        reader.close()


def _finished_in_engine(daemon) -> bool:
    with daemon.channel() as channel:
        load = pb_grpc.GenerationStub(channel).GetLoad(pb.GetLoadRequest(), timeout=5)
    return load.num_running == 0 and load.num_waiting == 0 and load.kv_blocks_free == load.kv_blocks_total


def _wait_for(predicate, what: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def _ours_answer(responses) -> tuple[list[int], list[tuple[int, float]], int]:
    tokens, logprobs = [], []
    for response in responses:
        tokens += response.token_ids
        logprobs += [(lp.token_id, lp.logprob) for lp in response.logprobs]
        assert len(response.logprobs) == len(response.token_ids), "a message's logprobs align with its tokens"
    return tokens, logprobs, responses[-1].finish_reason


def _theirs_answer(responses) -> tuple[list[int], list[tuple[int, float]], str]:
    tokens, logprobs = [], []
    for response in responses[:-1]:
        chunk = response.chunk
        assert list(chunk.output_logprobs.token_ids) == list(chunk.token_ids), "logprobs align with tokens"
        tokens += chunk.token_ids
        logprobs += zip(chunk.output_logprobs.token_ids, chunk.output_logprobs.token_logprobs)
        assert len(chunk.output_logprobs.top_logprobs) == len(chunk.token_ids)
    assert responses[-1].HasField("complete")
    return tokens, logprobs, responses[-1].complete.finish_reason


def _same(held, kept_up):
    (tokens, logprobs, finish), (want_tokens, want_logprobs, want_finish) = held, kept_up
    assert len(tokens) == MAX_TOKENS and tokens == want_tokens
    assert [t for t, _ in logprobs] == tokens
    assert [v for _, v in logprobs] == pytest.approx([v for _, v in want_logprobs], abs=1e-4)
    assert finish == want_finish


def _theirs_unary(response) -> tuple[list[int], list[tuple[int, float]], str]:
    complete = response.complete
    return (list(complete.output_ids), list(zip(complete.output_logprobs.token_ids,
                                                 complete.output_logprobs.token_logprobs)), complete.finish_reason)


def test_beastserve_stream_held_back_loses_nothing(daemon):
    held = [pb.GenerateResponse.FromString(m) for m in
            _held_then_read(daemon, "/beastserve.v1.Generation/GenerateStream", _ours("held"))]
    with daemon.channel() as channel:
        unary = pb_grpc.GenerationStub(channel).Generate(_ours("unary"), timeout=30)
    assert len(held) <= 2 + MAX_TOKENS // INTERVAL, [len(r.token_ids) for r in held]
    assert held[-1].finish_reason == pb.FINISH_REASON_LENGTH and held[-1].usage.completion_tokens == MAX_TOKENS
    _same(_ours_answer(held), _ours_answer([unary]))


def test_vllm_stream_held_back_loses_nothing(daemon):
    held = [vpb.GenerateResponse.FromString(m) for m in
            _held_then_read(daemon, "/vllm.grpc.engine.VllmEngine/Generate", _theirs("held-vllm"))]
    with daemon.channel() as channel:
        (unary,) = vpb_grpc.VllmEngineStub(channel).Generate(_theirs("unary-vllm", stream=False), timeout=30)
    assert len(held) - 1 <= 2 + MAX_TOKENS // INTERVAL, [len(r.chunk.token_ids) for r in held[:-1]]
    assert held[-2].chunk.completion_tokens == MAX_TOKENS
    _same(_theirs_answer(held), _theirs_unary(unary))


def test_stream_interval_gathers_tokens_but_sends_the_first_at_once(daemon):
    with daemon.channel() as channel:
        ours = list(pb_grpc.GenerationStub(channel).GenerateStream(_ours("gathered"), timeout=30))
        unary = pb_grpc.GenerationStub(channel).Generate(_ours("unary-2"), timeout=30)
        theirs = list(vpb_grpc.VllmEngineStub(channel).Generate(_theirs("gathered-vllm"), timeout=30))
        (their_unary,) = vpb_grpc.VllmEngineStub(channel).Generate(_theirs("unary-vllm-2", stream=False), timeout=30)
    assert ours[0].token_ids and not ours[0].finish_reason  # the first token did not wait for others
    assert all(len(r.token_ids) >= INTERVAL for r in ours[1:-1]), [len(r.token_ids) for r in ours]
    assert len(ours) <= 2 + MAX_TOKENS // INTERVAL
    _same(_ours_answer(ours), _ours_answer([unary]))
    chunks = [r.chunk for r in theirs[:-1]]
    assert all(len(c.token_ids) >= INTERVAL for c in chunks[1:-1]), [len(c.token_ids) for c in chunks]
    _same(_theirs_answer(theirs), _theirs_unary(their_unary))


def test_joining_keeps_each_completion_in_order_with_its_logprobs_and_ends_at_an_error():
    """n > 1: a step's deltas of two completions interleave; each joins in its own order, an error ends the list."""
    from scheduler.core.outputs import RequestOutput, TokenLogprob
    from server.inbox import coalesce

    def delta(index, ids, **kw):
        return RequestOutput("r", ids, "".join(map(chr, ids)), [TokenLogprob(t, -t / 100) for t in ids], index=index,
                             **kw)

    first = delta(0, [97, 98], prompt_logprobs=[None])
    joined = coalesce([first, delta(1, [99]), delta(0, [100], finished=True, finish_reason="length",
                                                     held_back_bytes=1), delta(1, [101])])
    assert [(o.index, o.token_ids, o.text, o.finished) for o in joined] == [(0, [97, 98, 100], "abd", True),
                                                                          (1, [99, 101], "ce", False)]
    assert all([lp.token_id for lp in o.logprobs] == o.token_ids for o in joined)
    assert joined[0].prompt_logprobs == [None] and joined[0].held_back_bytes == 1 and joined[1].prompt_logprobs is None
    assert first.token_ids == [97, 98] and len(first.logprobs) == 2  # the deltas themselves are left as they were
    failed = RequestOutput("r", [], "", finished=True, finish_reason="abort", error="boom")
    ended = coalesce([delta(0, [97]), delta(0, [98]), failed, delta(1, [99])])
    assert [(o.token_ids, o.error) for o in ended] == [([97, 98], None), ([], "boom")]


def test_the_inbox_hands_what_waited_over_at_once_and_wakes_by_the_interval():
    """Deltas put while the consumer was busy are taken together and join into one output; with an interval, the
    consumer is woken for the first token, then not before `interval` tokens wait, or at the end."""
    import asyncio

    from scheduler.core.outputs import RequestOutput
    from server.inbox import Inbox, coalesce

    def delta(ids, finished=False):
        return RequestOutput("r", ids, "".join(map(chr, ids)), finished=finished,
                             finish_reason="length" if finished else None)

    async def scenario():
        loop = asyncio.get_running_loop()
        behind = Inbox(loop, interval=1, max_pending=64)
        for i in range(5):  # the consumer was busy for five steps
            behind.put(delta([97 + i]))
        (joined,) = coalesce(await behind.take())
        assert joined.token_ids == [97, 98, 99, 100, 101] and joined.text == "abcde"

        gathered = Inbox(loop, interval=4, max_pending=64)
        taken = []

        async def consume():
            while not taken or not taken[-1][-1].finished:
                taken.append(await gathered.take())

        consumer = asyncio.create_task(consume())
        for i in range(10):
            gathered.put(delta([97 + i], finished=i == 9))
            await asyncio.sleep(0)  # the consumer runs whenever it is woken
            await asyncio.sleep(0)
        await asyncio.wait_for(consumer, 5)
        assert [[o.token_ids[0] for o in batch] for batch in taken] == [[97], [98, 99, 100, 101],
                                                                       [102, 103, 104, 105], [106]]
        paused = Inbox(loop, interval=4, max_pending=3)
        paused.put(delta([97]))
        await paused.take()
        assert [paused.put(delta([98 + i])) for i in range(3)] == [1, 2, 3] and paused.ready  # max_pending wakes it

    asyncio.run(scenario())
