"""Speculation inside the overlapped loop: drafts proposed on the device from the step in flight's tokens, positions
moved on the device by counts the host has not read, counts applied a step late, rejected slots never counted."""

from __future__ import annotations

import random

import pytest
import torch

from scheduler import Engine, SamplingParams
from scheduler.core.request import Request
from scheduler.loop.executor import StepInFlight
from scheduler.speculative.depth import AdaptiveDepth
from scheduler.speculative.loop import DeviceHistory, DraftStepInFlight
from scheduler.speculative.ngram import NgramProposer, propose_ngram
from scheduler.speculative.ngram_device import propose_ngram_on_device
from scheduler.worker.models import load_model
from scheduler.worker.packing import ForwardItem
from scheduler.worker.runner import ModelRunner
from tests.conftest import hf_greedy, tiny_config
from tests.helpers import assert_pool_idle

CPU = torch.device("cpu")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_device_lookup_proposes_what_the_host_lookup_does(device):
    proposer = NgramProposer(1, 1)  # on CUDA, the Triton kernel
    rng = random.Random(3)
    for _ in range(200):
        histories = [[rng.randrange(4) for _ in range(rng.randrange(1, 40))] for _ in range(4)]
        k, n_min = rng.randrange(1, 5), rng.randrange(1, 3)
        n_max = rng.randrange(n_min, 5)
        rows = torch.randint(0, 4, (4, max(map(len, histories)) + 3), dtype=torch.int32)  # past each length: junk
        for r, h in enumerate(histories):
            rows[r, :len(h)] = torch.tensor(h)
        proposer.n_min, proposer.n_max = n_min, n_max
        drafts, found = proposer.propose_on_device(rows.to(device), torch.tensor([len(h) for h in histories],
                                                                                 device=device), k)
        assert [drafts[r, :found[r]].tolist() for r in range(4)] == \
            [propose_ngram(h, k, n_min, n_max) for h in histories]


def test_drafts_come_from_the_tokens_of_the_step_in_flight():
    # The host knows ... 5 6 7; the step in flight sampled 8, which only the device holds. From the host's tokens
    # the lookup would draft 8 5 6; with the 8 it drafts what followed the earlier 5 6 7 8.
    request = Request("r", [5, 6, 7, 8, 9, 5, 6, 7], SamplingParams())
    history = DeviceHistory(num_rows=2, width=32, device=CPU)
    in_flight = StepInFlight([request], {request: 0}, torch.tensor([8]), None, torch.tensor([8]), None)
    arrays = history.plan([request], [0])
    bound = int(arrays[1].max())
    rows, lengths = history.update([torch.from_numpy(a) for a in arrays], bound, in_flight)
    drafts, found = propose_ngram_on_device(rows, lengths, 3, 1, 4)
    assert drafts[0, :found[0]].tolist() == [9, 5, 6]
    assert propose_ngram(request.all_token_ids, 3, 1, 4) == [8, 9, 5]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_moved_item_computes_what_the_item_at_its_true_start_does(device):
    device = torch.device(device)
    model = load_model(tiny_config(), None, "dummy", torch.float32, device, None).model
    runner = ModelRunner(model, num_blocks=8, block_size=4, dtype=torch.float32, device=device)
    if device.type == "cuda":  # the moves are made in the graphs' own input buffers
        runner.capture_graphs(max_num_seqs=2, max_query_len=2, max_model_len=32)
    table = [0, 1, 2, 3]
    runner.forward([ForwardItem([3, 1, 4, 1, 5, 9, 2, 6, 5, 3], 0, table, 1)])
    tokens = torch.tensor([[7, 8]], device=device)
    at_ten = runner.forward([ForwardItem([0, 0], 10, table, 2, 0, 2)], device_tokens=tokens)
    k_cache = runner.kv_caches[0][0]
    before = k_cache.clone()
    # The host thinks the item starts at 7 (no draft of the step before accepted); the device knows 3 were.
    moved = runner.forward([ForwardItem([0, 0], 7, table, 2, 0, 2)], device_tokens=tokens,
                           device_shifts=torch.tensor([3], device=device))
    # (The attention reads the context padded to a bound the host knows: the same sums, in another order.)
    assert torch.allclose(moved, at_ten, rtol=1e-5, atol=1e-6)
    assert torch.equal(k_cache, before)  # it wrote the slots of positions 10 and 11 again, those of 7 and 8 not
    unmoved = runner.forward([ForwardItem([0, 0], 7, table, 2, 0, 2)], device_tokens=tokens)
    assert not torch.allclose(unmoved, at_ten, rtol=1e-2, atol=1e-3)
    assert runner.graphs is None or runner.graphs.num_replays == 3


def test_counts_reach_the_host_a_step_late_and_rejected_slots_are_never_counted(tiny_model_dir):
    path, model = tiny_model_dir
    engine = Engine(model=str(path), dtype="float32", speculative="ngram", num_speculative_tokens=3,
                    adaptive_speculation=False, speculation_in_loop=True)
    prompt, aborted = [7, 8, 9, 10, 11] * 8, [3, 4, 5] * 10
    stream = engine.add_request(None, SamplingParams(temperature=0, max_tokens=30, n=2, ignore_eos=True),
                                prompt_token_ids=prompt)
    engine.add_request("gone", SamplingParams(temperature=0, max_tokens=30), prompt_token_ids=aborted)
    loop_steps = steps = 0
    while engine.has_unfinished():
        launched_drafts = isinstance(engine._in_flight, DraftStepInFlight)
        engine.step()
        steps += 1
        # A step verified on the device is collected by the next: its drafts reach the host one step on.
        assert (engine.last_step_stats.num_draft_tokens > 0) <= launched_drafts
        if isinstance(engine._in_flight, DraftStepInFlight):
            loop_steps += 1
            for request in engine._in_flight.requests:
                # The host counts as computed what it knows: accepted drafts of the steps it has read, neither
                # rejected ones nor anything of the step in flight; the blocks hold that step's furthest reach.
                assert request.num_computed_tokens == len(request.all_token_ids)
                assert request.num_placeholders == 1
                assert engine.pool.has_room(request, request.num_computed_tokens + 1 + request.num_drafts_in_flight)
        if steps == 4:
            engine.abort("gone")
    deltas = list(iter(stream.get_nowait, None))
    completions = {}
    for delta in deltas:
        completions.setdefault(delta.index, []).extend(delta.token_ids)
    assert list(completions.values()) == [hf_greedy(model, prompt, 30)] * 2
    metrics = [d.metrics for d in deltas if d.finished]
    drafted, accepted = sum(m.draft_tokens for m in metrics), sum(m.accepted_tokens for m in metrics)
    assert loop_steps > steps / 2 and 0 < accepted < drafted  # drafts verified in the loop, some rejected
    assert_pool_idle(engine)


def test_when_no_draft_is_accepted_the_depth_stays_at_0_and_only_k_1_is_re_timed():
    depth = AdaptiveDepth(k_max=4)
    chosen = []
    for _ in range(2000):
        k = depth.choose(16)
        chosen.append(k)
        depth.observe_step(16, k, 0.010 + 0.001 * k)
        if k:
            for _ in range(16):
                depth.observe_acceptance(k, 0)
    late = chosen[200:]
    assert set(late) <= {0, 1} and late.count(1) < 0.01 * len(late)
