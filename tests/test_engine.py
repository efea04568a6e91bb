"""Engine behaviour at the request level: stopping, seeds, logprobs, aborts, bad input, streaming."""

from __future__ import annotations

import math
import threading

import pytest

from scheduler import LLM, Engine, SamplingParams
from tests.helpers import assert_pool_idle, run_engine


@pytest.fixture(scope="module")
def llm(tiny_text_model_dir):
    path, _ = tiny_text_model_dir
    return LLM(str(path), max_num_batched_tokens=64)


PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away,", "Numbers: 1 2 3", "Hello"]


def greedy(max_tokens=20, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def test_stop_string_across_token_boundary_is_cut(llm):
    base = llm.generate(PROMPTS[0], greedy(30))[0]
    token_texts = [llm.tokenizer.decode([t]) for t in base.token_ids]
    # A stop string made of the end of token 5 and the start of token 6: it spans a boundary.
    left, right = token_texts[5], token_texts[6]
    assert left and right
    stop = left[-2:] + right[:2] if len(left) >= 2 and len(right) >= 2 else left + right
    cut_at = base.text.index(stop)
    out = llm.generate(PROMPTS[0], greedy(30, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base.text[:cut_at]
    kept = llm.generate(PROMPTS[0], greedy(30, stop=[stop], include_stop_str_in_output=True))[0]
    assert kept.text == base.text[:cut_at + len(stop)]


def test_stop_token_ids_and_min_tokens(llm):
    base = llm.generate(PROMPTS[1], greedy(20))[0]
    stop_id = base.token_ids[3]
    first = base.token_ids.index(stop_id)
    out = llm.generate(PROMPTS[1], greedy(20, stop_token_ids=[stop_id]))[0]
    assert out.token_ids == base.token_ids[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)
    # min_tokens forbids the stop token until 8 tokens are out: generation goes past it.
    late = llm.generate(PROMPTS[1], greedy(20, stop_token_ids=[stop_id], min_tokens=8))[0]
    assert len(late.token_ids) >= 8
    assert stop_id not in late.token_ids[:8]


def test_eos_stops_unless_ignored(tiny_model_dir, tmp_path):
    path, model = tiny_model_dir
    prompt = [5, 6, 7, 8]
    base = run_engine(Engine(model=str(path)), [prompt], greedy(20))[0].token_ids
    eos = base[4]
    # The same weights, with EOS declared as the token greedy decoding produces fifth.
    model.config.eos_token_id = eos
    model.save_pretrained(tmp_path)
    engine = Engine(model=str(tmp_path))
    stopped = run_engine(engine, [prompt], greedy(20))[0]
    assert stopped.token_ids == base[:base.index(eos) + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", None)
    ignored = run_engine(engine, [prompt], greedy(20, ignore_eos=True))[0]
    assert ignored.token_ids == base and ignored.finish_reason == "length"
    model.config.eos_token_id = None


def test_max_tokens_is_exact(llm):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.8, max_tokens=7, ignore_eos=True, seed=1))
    assert [len(o.token_ids) for o in outs] == [7] * len(PROMPTS)
    assert all(o.finish_reason == "length" for o in outs)


def test_seeded_sampling_is_the_same_whatever_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(PROMPTS[1], params)[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)] * 3
    crowded = llm.generate(PROMPTS[:1] + PROMPTS[1:2] + PROMPTS[2:], others[:1] + [params] + others[1:])[1].token_ids
    assert alone == crowded
    different_seed = llm.generate(PROMPTS[1], SamplingParams(temperature=1.0, top_p=0.9, seed=4321, max_tokens=16,
                                                             ignore_eos=True))[0].token_ids
    assert different_seed != alone


def test_logprobs_are_per_token_and_top_n(llm):
    out = llm.generate(PROMPTS[0], greedy(6, logprobs=3))[0]
    assert len(out.logprobs) == len(out.token_ids)
    for token_id, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == token_id and lp.logprob <= 0 and math.isfinite(lp.logprob)
        assert len(lp.top) == 3
        # Greedy picks the most likely token: it heads the top-n list.
        assert lp.top[0][0] == token_id and lp.top[0][1] == pytest.approx(lp.logprob)
    assert llm.generate(PROMPTS[0], greedy(3))[0].logprobs is None


def test_streaming_deltas_rebuild_the_whole_answer(llm):
    engine = llm.engine
    stream = engine.add_request("Streaming test:", greedy(25, stop=["zz"], ignore_eos=True))
    deltas = []
    while not stream.finished:
        engine.step()
        while (d := stream.get_nowait()) is not None:
            deltas.append(d)
    assert deltas[-1].finished and sum(d.finished for d in deltas) == 1
    token_ids = [t for d in deltas for t in d.token_ids]
    if deltas[-1].finish_reason == "length":
        assert "".join(d.text for d in deltas) == llm.tokenizer.decode(token_ids, skip_special_tokens=True)
    assert "".join(d.text for d in deltas) == llm.generate("Streaming test:", greedy(25, stop=["zz"],
                                                                                 ignore_eos=True))[0].text
    assert all("\ufffd" not in d.text for d in deltas)


def test_abort_frees_blocks_waiting_or_running(tiny_model_dir):
    path, _ = tiny_model_dir
    engine = Engine(model=str(path), max_num_seqs=2)
    streams = [engine.add_request(None, greedy(50), prompt_token_ids=[1 + i] * (10 + 7 * i)) for i in range(4)]
    for _ in range(3):
        engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 2
    engine.abort(streams[0].request_id)  # running
    engine.abort(streams[3].request_id)  # still waiting
    engine.abort("no-such-request")  # ignored
    while engine.has_unfinished():
        engine.step()
    finals = [_last(s) for s in streams]
    assert [f.finish_reason for f in finals] == ["abort", "length", "length", "abort"]
    assert_pool_idle(engine)


def test_a_request_id_is_taken_from_queued_until_finished(tiny_model_dir):
    path, _ = tiny_model_dir
    engine = Engine(model=str(path), max_num_seqs=2)
    for i in range(3):
        engine.add_request(None, greedy(4), prompt_token_ids=[1 + i] * 5, request_id=f"r{i}")
    with pytest.raises(ValueError, match="request_id: 'r1' is already in use"):  # queued, no step yet
        engine.add_request(None, greedy(4), prompt_token_ids=[7] * 5, request_id="r1")
    assert engine.abort("r2")  # found while queued
    engine.step()
    with pytest.raises(ValueError, match="request_id: 'r0' is already in use"):  # running
        engine.add_request(None, greedy(4), prompt_token_ids=[7] * 5, request_id="r0")
    while engine.has_unfinished():
        engine.step()
    again = engine.add_request(None, greedy(4), prompt_token_ids=[7] * 5, request_id="r0")  # free once it ended
    while engine.has_unfinished():
        engine.step()
    assert _last(again).finish_reason == "length"
    assert_pool_idle(engine)


def _last(stream):
    last = None
    while (d := stream.get_nowait()) is not None:
        last = d
    return last


def test_requests_added_from_other_threads(tiny_model_dir):
    path, _ = tiny_model_dir
    engine = Engine(model=str(path))
    streams = []

    def client(i):
        streams.append(engine.add_request(None, greedy(5), prompt_token_ids=[i + 1] * 8))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    while engine.has_unfinished():
        engine.step()
    assert len(streams) == 16 and all(_last(s).num_output_tokens == 5 for s in streams)
    assert_pool_idle(engine)


def test_request_too_big_for_pool_is_refused_up_front(tiny_model_dir):
    path, _ = tiny_model_dir
    engine = Engine(model=str(path), kv_cache_bytes=4 * 8192)  # 4 blocks = 64 tokens
    assert engine.max_model_len == 64
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request(None, greedy(30), prompt_token_ids=[1] * 40)
    with pytest.raises(ValueError, match="prompt has 64 tokens"):
        engine.add_request(None, greedy(1), prompt_token_ids=[1] * 64)
    out = run_engine(engine, [[1] * 40], greedy(24))
    assert len(out[0].token_ids) == 24
    assert_pool_idle(engine)


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(frequency_penalty=float("inf")), "frequency_penalty"),
    (dict(logprobs=21), "logprobs"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(stop=[""]), "stop"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_name_the_field(llm):
    engine = llm.engine
    with pytest.raises(ValueError, match="prompt must not be empty"):
        engine.add_request("", greedy())
    with pytest.raises(ValueError, match="prompt must not be empty"):
        engine.add_request(None, greedy(), prompt_token_ids=[])
    with pytest.raises(ValueError, match="prompt token id .* outside the vocabulary"):
        engine.add_request(None, greedy(), prompt_token_ids=[1, engine.vocab_size])
    for bad in ("7", 1.5, True):
        with pytest.raises(ValueError, match="prompt token ids must be integers"):
            engine.add_request(None, greedy(), prompt_token_ids=[1, bad])
    with pytest.raises(ValueError, match="prompt has .* tokens; max_model_len"):
        engine.add_request(None, greedy(1), prompt_token_ids=[1] * engine.max_model_len)
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.add_request("hi", greedy(stop_token_ids=[engine.vocab_size + 5]))
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("hi", greedy(), request_id="dup")
        engine.add_request("hi", greedy(), request_id="dup")
    engine.abort("dup")
    while engine.has_unfinished():
        engine.step()
    with pytest.raises(ValueError, match="params"):
        llm.generate(["a", "b"], [greedy()])
    assert_pool_idle(engine)


def test_chat_uses_the_template(llm):
    messages = [{"role": "user", "content": "Say hi"}]
    ids = llm.engine.inputs.render_chat(messages)
    text = llm.tokenizer.decode(ids)
    assert "<|im_start|>user\nSay hi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    out = llm.chat(messages, greedy(5))[0]
    assert out.prompt_token_ids == ids and len(out.token_ids) <= 5
    with pytest.raises(ValueError, match="role"):
        llm.chat([{"role": "", "content": "x"}], greedy())
