"""EAGLE heads: a head trained here for a tiny target drafts what its dense forward predicts, outputs stay
the target's (greedy and sampled), and the head is found by the target's fingerprint."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from bench.eagle_gap import record_proposals
from scheduler import LLM, Engine, SamplingParams, StructuredOutputsParams
from scheduler.speculative.draft import compact
from scheduler.speculative.draft.proposer import DraftModelProposer
from scheduler.speculative.eagle import files
from scheduler.speculative.eagle.head import EagleHead, aux_hidden_states, default_layer_ids
from scheduler.speculative.eagle.proposer import EagleProposer
from scheduler.speculative.ngram import NgramProposer
from tests.conftest import hf_greedy, save_tiny_model, tiny_config
from tests.helpers import assert_pool_idle, run_engine
from tests.test_speculative import _chi_square_critical, _reference_joint

MAX_TOKENS = 24
DEPTH = 3


def train_head(model, steps: int, seed: int = 0) -> EagleHead:
    """A head for `model` (a transformers Llama) after `steps` steps of training-time test on the model's
    own greedy continuations of random prompts: each of DEPTH unrolled steps learns the model's next pick."""
    torch.manual_seed(seed)
    embed, lm_head = model.model.embed_tokens.weight.detach(), model.lm_head.weight.detach()
    head = EagleHead.for_target(model.config).bind(embed, lm_head)
    vocab = model.config.vocab_size
    with torch.no_grad():
        pool = model.generate(torch.randint(0, vocab, (32, 4)), attention_mask=torch.ones(32, 4, dtype=torch.long),
                              max_new_tokens=28, do_sample=False, pad_token_id=0)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    length = pool.shape[1]
    for _ in range(steps):
        ids = pool[torch.randint(0, len(pool), (8,))]
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        aux, picks = aux_hidden_states(out.hidden_states, head.layer_ids), out.logits.argmax(-1)
        loss = 0
        for s, hidden in enumerate(head.unroll(ids, aux, DEPTH)):
            rows = length - 2 - s  # row i reads token i + 1 + s and predicts the model's pick after it
            loss = loss + F.cross_entropy(head.logits(hidden[:, :rows]).flatten(0, 1), picks[:, 1 + s:1 + s + rows]
                                          .flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head


def save_head(head: EagleHead, model, path) -> None:
    files.save_head(head, path, {"target": "tiny", "target_fingerprint": compact.target_fingerprint(model),
                                 "command": "tests/test_eagle.py"})


def assert_drafts_are_dense(model, head: EagleHead, seen: list, sequences: dict) -> int:
    """Every first draft of `seen` (bench.eagle_gap.record_proposals), and every later one after drafts the
    sequence took, is what unroll() predicts over the final sequence (sequences: prompt -> prompt + answer).
    Returns how many drafts were compared."""
    compared = 0
    for prompt, num_tokens, drafts in seen:
        sequence = sequences[prompt]
        ids = torch.tensor([sequence])
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
            steps = head.unroll(ids, aux_hidden_states(out.hidden_states, head.layer_ids), len(drafts))
        for j, draft in enumerate(drafts):
            logits = head.logits(steps[j][0, num_tokens - 2]).float()
            top2 = logits.topk(2).values
            if num_tokens + j - 1 >= len(sequence) or top2[0] - top2[1] < 1e-3:
                break  # past the sequence, or a near tie that rounding may flip
            assert draft == int(head.token_ids(logits.argmax())), (num_tokens, j)
            compared += 1
            if draft != sequence[num_tokens + j]:
                break  # later drafts read this one, not the sequence's token
    return compared


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    path, model = tiny_model_dir
    head_dir = tmp_path_factory.mktemp("eagle-head")
    save_head(train_head(model, steps=40), model, head_dir)
    rng = random.Random(5)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (1, 9, 30, 70, 100)]
    prompts += [prompts[2] * 3]  # its first block comes from the prefix cache
    return path, model, head_dir, prompts, [hf_greedy(model, p, MAX_TOKENS) for p in prompts]


def eagle_engine(path, head_dir, **options) -> Engine:
    return Engine(model=str(path), dtype="float32", speculative="eagle", eagle_head=str(head_dir),
                  num_speculative_tokens=DEPTH, **options)


def test_head_layers_and_file():
    assert default_layer_ids(30) == (1, 14, 26)  # the default model's: low, middle, high, never the last
    assert default_layer_ids(2) == (0, 0, 0)
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         num_hidden_layers=30, vocab_size=49152)
    own = sum(p.numel() for p in EagleHead.for_target(config).parameters())
    assert own * 2 < 20e6  # the default model's head in bfloat16 fits the 20 MB it may take in the wheel


@pytest.mark.parametrize("variant", ["plain", "draft_vocab", "every_other"])
def test_drafts_are_the_dense_heads_predictions_and_greedy_is_unchanged(setup, tmp_path, variant):
    """Every first draft, and every later one after drafts the target took, is what unroll() predicts over
    the final sequence: the paged head reads the same features, positions and keys as the dense one.
    Chunked prompts, preemption and a prefix-cache hit included. draft_vocab: the head proposes only some
    tokens (most of the answers' and a few more), mapped back to the target's ids as the dense head's are.
    every_other: steps without drafts between (they overlap), after which the head's rows lag the target's, also
    in the blocks a preempted request finds cached again."""
    path, model, head_dir, prompts, expected = setup
    if variant == "draft_vocab":
        for name in (files.HEAD_JSON, files.WEIGHTS_FILE):
            (tmp_path / name).symlink_to(head_dir / name)
        answers = sorted({t for e in expected for t in e})
        compact.save_vocab(tmp_path, {t for t in answers if t % 4} | set(range(0, 512, 7)))
        head_dir = tmp_path
    engine = eagle_engine(path, head_dir, kv_cache_bytes=14 * 2 * 8192, max_num_batched_tokens=32,
                          adaptive_speculation=False, overlap_scheduling=variant == "every_other")
    if variant == "every_other":
        draft_every_other_step(engine)
    proposer, seen = engine.speculator.proposer, record_proposals(engine)
    outputs = run_engine(engine, prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), arrive_every=1)
    assert [o.token_ids for o in outputs] == expected
    assert sum(o.metrics.preemptions for o in outputs) > 0 and outputs[-1].num_cached_tokens > 0
    head = proposer.head
    assert (head.vocab_ids is not None) == (variant == "draft_vocab")
    compared = assert_drafts_are_dense(model, head, seen, {tuple(p): p + e for p, e in zip(prompts, expected)})
    assert compared > len(seen)
    drafted = sum(o.metrics.draft_tokens for o in outputs)
    assert 0 < sum(o.metrics.accepted_tokens for o in outputs) < drafted
    assert_pool_idle(engine)


def draft_every_other_step(engine: Engine) -> None:
    plan, planned = engine.executor.plan, itertools.count()
    engine.executor.plan = lambda num_decodes, prefill: plan(num_decodes, prefill) if next(planned) % 2 else 0


def test_a_prompt_cached_by_a_request_that_opted_out_is_drafted_from_as_any_other(setup):
    """The head's rows of prefix-cache blocks are written whoever filled them: a request that found its prompt
    there, left by one that did not speculate, drafts what the dense head predicts."""
    path, model, head_dir, prompts, expected = setup
    engine = eagle_engine(path, head_dir, adaptive_speculation=False, overlap_scheduling=False)
    seen = record_proposals(engine)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    for speculative in (False, True):
        stream = engine.add_request(None, params, prompt_token_ids=prompts[4], speculative=speculative)
        while not stream.finished:
            engine.step()
        deltas = list(iter(stream.get_nowait, None))
        assert [t for d in deltas for t in d.token_ids] == expected[4]
    assert deltas[-1].num_cached_tokens >= 64 and deltas[-1].metrics.draft_tokens > 0
    compared = assert_drafts_are_dense(model, engine.speculator.proposer.head, seen,
                                       {tuple(prompts[4]): prompts[4] + expected[4]})
    assert compared >= len(seen) > 0  # every first draft at least
    assert_pool_idle(engine)


@pytest.mark.parametrize("in_loop", [False, True])
def test_adaptive_overlapped_steps_and_mixed_requests(setup, in_loop):
    """Adaptive depth (steps without drafts overlap), opt-outs, capped depths, n > 1 and an abort; in the loop
    too, where steps without drafts follow steps with them in flight and the depths differ between requests."""
    path, _, head_dir, prompts, expected = setup
    engine = eagle_engine(path, head_dir, speculation_in_loop=in_loop)
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    streams = [engine.add_request(None, greedy, prompt_token_ids=p, speculative=i % 3 != 0,
                                  max_draft_tokens=2 if i % 3 == 1 else None) for i, p in enumerate(prompts)]
    pair = engine.add_request(None, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, n=2),
                              prompt_token_ids=prompts[3])
    doomed = engine.add_request(None, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True),
                                prompt_token_ids=prompts[4])
    for step in range(400):
        engine.step()
        if step == 6:
            assert engine.abort(doomed.request_id)
        if not engine.has_unfinished():
            break
    for i, (stream, want) in enumerate(zip(streams, expected)):
        deltas = list(iter(stream.get_nowait, None))
        assert [t for d in deltas for t in d.token_ids] == want
        assert (deltas[-1].metrics.draft_tokens == 0) == (i % 3 == 0)
    deltas = list(iter(pair.get_nowait, None))
    for index in (0, 1):
        assert [t for d in deltas if d.index == index for t in d.token_ids] == expected[3]
    assert engine.num_overlapped_steps > 0
    assert_pool_idle(engine)


def test_adaptive_depth_is_planned_after_the_verification_in_flight(setup):
    """The step after a verification plans its depth once the verification is applied, its request counted as
    a decode: adaptive steps do not fall back to no drafts every other step."""
    path, _, head_dir, prompts, expected = setup
    engine = eagle_engine(path, head_dir)
    planned, plan = [], engine.executor.plan

    def spy(num_decodes, prefill):
        planned.append(num_decodes)
        return plan(num_decodes, prefill)

    engine.executor.plan = spy
    outputs = run_engine(engine, prompts[3:4], SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    assert outputs[0].token_ids == expected[3] and outputs[0].metrics.draft_tokens > 0
    decoding = planned[planned.index(1):-1]  # from its first decode to the step that learns it ended
    assert decoding and set(decoding) == {1}, planned


@pytest.mark.gpu
@pytest.mark.parametrize("in_loop", [False, True])
def test_cuda_graphed_proposals_equal_the_eager_chain_and_greedy_equals_off(setup, in_loop):
    """On CUDA a greedy proposal replays the head's graph of its batch-size bucket; the same inputs through the
    eager chain draft the same tokens, and greedy outputs equal speculation off's. in_loop: proposals that
    follow the step in flight (speculation_in_loop), its tokens patched in and its dropped rows read on the
    device, likewise."""
    path, _, head_dir, prompts, _ = setup
    options = dict(device="cuda", max_num_seqs=8, max_num_batched_tokens=32, kv_cache_bytes=64 * 2 * 8192)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    off = run_engine(Engine(model=str(path), dtype="float32", **options), prompts, params, arrive_every=1)
    engine = eagle_engine(path, head_dir, adaptive_speculation=False, speculation_in_loop=in_loop, **options)
    runner = engine.speculator.proposer.runner
    assert runner.graphs is not None
    pairs, replay, replay_after = [], runner.greedy_proposal, runner.chain_after

    def both(items, passes):
        graphed = replay(items, passes)
        if graphed is not None:  # the eager chain rewrites the same rows with the same keys and values
            pairs.append((graphed.clone(), runner.chain(items, passes)))
        return graphed

    def both_after(items, device_tokens, back, passes):
        fits = runner.proposal_fits(items, passes)
        drafts = replay_after(items, device_tokens, back, passes)
        if fits:
            pairs.append((drafts.clone(), runner.chain_after_eagerly(items, device_tokens, back, passes)))
        return drafts

    runner.greedy_proposal, runner.chain_after = both, both_after
    outputs = run_engine(engine, prompts, params, arrive_every=1)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in off]
    assert len(pairs) >= 10 and runner.graphs.num_proposal_replays == len(pairs)
    # The graph pads its rows to the bucket, and cuBLAS may pick another kernel for another row count: a near
    # tie may flip, so nearly all, not all, drafts must agree.
    same = sum(int((graphed == eager).all()) for graphed, eager in pairs)
    assert same >= 0.95 * len(pairs), (same, len(pairs))
    assert sum(o.metrics.accepted_tokens for o in outputs) > 0
    assert_pool_idle(engine)


@pytest.mark.parametrize("head_vocab", [None, [0, 2, 4]])
def test_sampling_with_the_head_keeps_the_target_distribution(tmp_path, head_vocab):
    """head_vocab: the head proposes only these tokens (its logits restricted to them)."""
    vocab, prompt, length, samples = 5, [1, 2, 3], 3, 4000
    target = save_tiny_model(tmp_path / "target", tiny_config(vocab_size=vocab), seed=1)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.05)  # a spread-out distribution, so many continuations matter
    target.save_pretrained(tmp_path / "target")
    torch.manual_seed(3)
    head = EagleHead.for_target(target.config).bind(target.model.embed_tokens.weight, target.lm_head.weight)
    save_head(head, target, tmp_path / "head")
    if head_vocab:
        compact.save_vocab(tmp_path / "head", head_vocab)
    engine = eagle_engine(tmp_path / "target", tmp_path / "head", adaptive_speculation=False, max_num_seqs=1024,
                          max_num_batched_tokens=8192)
    vocab_ids = engine.speculator.proposer.head.vocab_ids
    assert (vocab_ids is None) == (head_vocab is None)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=length, ignore_eos=True) for i in range(samples)]
    outputs = run_engine(engine, [prompt] * samples, params)
    assert 0 < sum(o.metrics.accepted_tokens for o in outputs) < sum(o.metrics.draft_tokens for o in outputs)
    assert {t for o in outputs for t in o.token_ids} == set(range(vocab))  # tokens the head never proposes too
    counts: dict[tuple, int] = {}
    for o in outputs:
        counts[tuple(o.token_ids)] = counts.get(tuple(o.token_ids), 0) + 1
    expected = _reference_joint(target, prompt, vocab, 1.0, 1.0, length)
    big = [k for k, p in expected.items() if p * samples >= 5]
    chi2 = sum((counts.get(k, 0) - samples * expected[k]) ** 2 / (samples * expected[k]) for k in big)
    rest_p, rest = 1 - sum(expected[k] for k in big), samples - sum(counts.get(k, 0) for k in big)
    if rest_p * samples >= 5:
        chi2 += (rest - samples * rest_p) ** 2 / (samples * rest_p)
    assert chi2 < _chi_square_critical(len(big)), f"chi2 {chi2:.1f} over {len(big)} cells"
    assert_pool_idle(engine)


def test_grammars_with_the_head(tiny_text_model_dir, tmp_path):
    path, model = tiny_text_model_dir
    save_head(EagleHead.for_target(model.config).bind(model.model.embed_tokens.weight, model.lm_head.weight),
              model, tmp_path)
    params = [SamplingParams(temperature=0, max_tokens=16, structured_outputs=StructuredOutputsParams(**so))
              for so in (dict(regex=r"[a-z]{3,12}"), dict(choice=["yes", "no"]), dict(json_object=True))]
    prompts = ["Say a word.", "Yes or no?", "JSON please."]
    off = LLM(str(path), dtype="float32").generate(prompts, params)
    llm = LLM(str(path), dtype="float32", speculative="eagle", eagle_head=str(tmp_path), num_speculative_tokens=DEPTH,
              adaptive_speculation=False)
    on = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in on] == [o.outputs[0].token_ids for o in off]
    assert_pool_idle(llm.engine)


def test_shipped_head_found_by_fingerprint_and_best(setup, tmp_path, monkeypatch):
    path, model, head_dir, _, _ = setup
    shipped = tmp_path / "heads"
    shipped.mkdir()
    (shipped / "tiny").symlink_to(head_dir)
    monkeypatch.setattr(files, "SHIPPED_HEADS", shipped)
    monkeypatch.setattr(compact, "SHIPPED_DRAFTS", tmp_path / "no-drafts")
    found = Engine(model=str(path), dtype="float32", speculative="eagle").speculator.proposer
    assert isinstance(found, EagleProposer) and found.head.layer_ids == [0, 0, 0]
    assert isinstance(Engine(model=str(path), speculative="best").speculator.proposer, EagleProposer)
    other = tmp_path / "other"
    save_tiny_model(other, tiny_config(), seed=11)
    with pytest.raises(ValueError, match="needs eagle_head .* no head shipped"):
        Engine(model=str(other), speculative="eagle")
    with pytest.raises(ValueError, match="eagle_head: made for another target"):
        Engine(model=str(other), speculative="eagle", eagle_head=str(head_dir))
    assert isinstance(Engine(model=str(other), speculative="best").speculator.proposer, NgramProposer)
    best_draft = Engine(model=str(other), speculative="best", draft_model=str(path)).speculator.proposer
    assert isinstance(best_draft, DraftModelProposer)



def test_the_daemon_serves_with_the_head_on_both_protocols(tiny_text_model_dir, tmp_path):
    """--speculative best with --eagle-head: the daemon drafts with the head (GetModelInfo says which method
    best chose); gRPC and HTTP answer what a request that opts out of speculation gets."""
    from server.client import Client
    from tests.daemon import Daemon
    from tests.openai_http import call

    path, model = tiny_text_model_dir
    save_head(EagleHead.for_target(model.config).bind(model.model.embed_tokens.weight, model.lm_head.weight),
              model, tmp_path / "head")
    daemon = Daemon(str(path), "--speculative", "best", "--eagle-head", str(tmp_path / "head"),
                    "--no-adaptive-speculation", "--dtype", "float32", "--kv-cache-bytes", str(16 << 20),
                    log_path=tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        prompt = "The capital of France is"
        with Client(daemon.address, timeout=60) as client:
            assert client.model_info().speculative_mode == "eagle"
            got = client.generate(prompt, max_tokens=12, temperature=0)
            opted_out = client.generate(prompt, max_tokens=12, temperature=0, speculative=False)
        status, body = call(daemon.http_url + "/v1/completions", {"prompt": prompt, "max_tokens": 12,
                                                                   "temperature": 0})
        assert status == 200, body
        assert got.text == opted_out.text == body["choices"][0]["text"] and got.text
        assert got.timing.draft_tokens > 0 and opted_out.timing.draft_tokens == 0
        assert "speculative=best: eagle" in daemon.log()
    finally:
        assert daemon.close() == 0


SHIPPED_DEFAULT = files.SHIPPED_HEADS / "smollm2-135m-instruct"


@pytest.mark.skipif(not SHIPPED_DEFAULT.is_dir(), reason="no EAGLE head shipped for the default model")
def test_the_head_shipped_for_the_default_model_serves_it():
    """Found by the default model's fingerprint (no eagle_head given), picked by best on the CPU, lossless, and
    its first drafts accepted about as often as held out (~0.64-0.8 at depth 1)."""
    assert (SHIPPED_DEFAULT / files.WEIGHTS_FILE).stat().st_size <= 16_000_000
    assert files.read_manifest(SHIPPED_DEFAULT)["command"]
    chats = [[{"role": "user", "content": q}] for q in ("How do plants make food?", "Write a Python function that "
                                                        "returns the largest of three numbers.")]
    params = SamplingParams(temperature=0, max_tokens=48)
    plain = LLM("default", dtype="float32").chat(chats, params)
    llm = LLM("default", dtype="float32", device="cpu", speculative="best", adaptive_speculation=False,
              num_speculative_tokens=1)
    assert isinstance(llm.engine.speculator.proposer, EagleProposer)
    drafted = llm.chat(chats, params)
    assert [o.token_ids for o in drafted] == [o.token_ids for o in plain]
    accepted = sum(o.metrics.accepted_tokens for o in drafted)
    assert accepted / sum(o.metrics.draft_tokens for o in drafted) > 0.45
