"""The step executor on its own: one scheduled step in, tokens and bookkeeping out."""

from __future__ import annotations

import pytest
import torch

from scheduler.core.kv_cache import BlockPool
from scheduler.core.params import SamplingParams
from scheduler.core.request import Request
from scheduler.core.scheduler import Scheduler, StepOutput
from scheduler.loop.executor import StepExecutor
from scheduler.sampling.sampler import Sampler
from scheduler.speculative.ngram import NgramProposer
from scheduler.speculative.speculator import Speculator
from scheduler.worker.models import load_model
from scheduler.worker.runner import ModelRunner
from tests.conftest import tiny_config


def make(speculator=None, num_blocks=32, max_num_batched_tokens=64):
    model = load_model(tiny_config(), None, "dummy", torch.float32, torch.device("cpu"), None).model
    runner = ModelRunner(model, num_blocks=num_blocks, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    scheduler = Scheduler(BlockPool(num_blocks, 4, enable_prefix_caching=True), max_num_batched_tokens, 8)
    return StepExecutor(runner, Sampler(), scheduler, speculator), scheduler, model


def greedy_reference(model, prompt, n):
    """Argmax continuation by recomputing the whole sequence each time (no KV reuse)."""
    runner = ModelRunner(model, num_blocks=16, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    tokens = list(prompt)
    from scheduler.worker.packing import ForwardItem
    for _ in range(n):
        logits = runner.forward([ForwardItem(tokens, 0, list(range(-(-len(tokens) // 4))), 1)])
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


def test_a_prefill_step_samples_the_first_token_and_marks_the_prompt_computed():
    executor, scheduler, model = make()
    request = Request("r", [5, 6, 7, 8, 9], SamplingParams(temperature=0, max_tokens=4), max_total_tokens=64)
    scheduler.add(request)
    results = executor.execute(scheduler.schedule().scheduled)
    assert [r.request for r in results] == [request] and len(results[0].new_token_ids) == 1
    assert request.num_computed_tokens == 5 and request.output_token_ids == results[0].new_token_ids
    # The prompt's one full block is now in the prefix cache.
    assert executor.pool.find_cached_prefix(Request("s", [5, 6, 7, 8, 1], SamplingParams()))


def test_decode_steps_follow_the_models_argmax():
    executor, scheduler, model = make()
    prompt = [3, 1, 4, 1, 5, 9]
    request = Request("r", prompt, SamplingParams(temperature=0), max_total_tokens=64)
    scheduler.add(request)
    for _ in range(6):
        executor.execute(scheduler.schedule().scheduled)
    assert request.output_token_ids == greedy_reference(model, prompt, 6)
    assert request.num_computed_tokens == len(prompt) + 5  # the last token is not computed yet


def test_a_chunk_that_does_not_reach_the_end_of_the_prompt_samples_nothing():
    executor, scheduler, _ = make(max_num_batched_tokens=4)
    request = Request("r", list(range(10, 20)), SamplingParams(temperature=0), max_total_tokens=64)
    scheduler.add(request)
    assert executor.execute(scheduler.schedule().scheduled) == []
    assert request.num_computed_tokens == 4 and request.num_output_tokens == 0


def test_launched_steps_take_the_token_in_flight_from_the_device():
    """Each step is launched before the host reads the one before's token: the scheduler plans with it as a
    placeholder, the runner reads it on the device, and the host learns it a step later."""
    executor, scheduler, model = make()
    prompt = [3, 1, 4, 1, 5, 9]
    request = Request("r", prompt, SamplingParams(temperature=0), max_total_tokens=64)
    scheduler.add(request)
    in_flight = None
    for step in range(6):
        launched = executor.launch(scheduler.schedule().scheduled, in_flight)
        assert request.num_placeholders == (1 if step == 0 else 2)
        if in_flight is not None:
            assert [r.new_token_ids for r in executor.collect(in_flight)] == [request.output_token_ids[-1:]]
        in_flight = launched
        assert request.num_output_tokens == step and request.num_computed_tokens == len(prompt) + step
    executor.collect(in_flight)
    assert request.output_token_ids == greedy_reference(model, prompt, 6) and request.num_placeholders == 0


def test_a_steps_output_reaches_its_requests_once():
    """The scheduler applies what a step computed, once: a launched step collected twice gives its token once, and
    an output applied a second time is refused."""
    executor, scheduler, model = make()
    prompt = [3, 1, 4, 1, 5, 9]
    request = Request("r", prompt, SamplingParams(temperature=0), max_total_tokens=64)
    scheduler.add(request)
    first = executor.launch(scheduler.schedule().scheduled, None)
    second = executor.launch(scheduler.schedule().scheduled, first)
    assert executor.collect(first) == executor.collect(first)
    assert request.num_output_tokens == 1 and request.num_placeholders == 1
    executor.collect(second)
    assert request.output_token_ids == greedy_reference(model, prompt, 2) and request.num_placeholders == 0
    output = StepOutput([request], [7])
    scheduler.update_from_output(output)
    with pytest.raises(AssertionError, match="applied once"):
        scheduler.update_from_output(output)
    assert request.output_token_ids[2:] == [7] and request.num_computed_tokens == len(prompt) + 1


class KnownProposer(NgramProposer):
    """Drafts the model's own continuation with the last draft wrong: k - 1 accepted, every step."""

    def __init__(self, continuation: list[int], prompt_len: int):
        super().__init__(1, 1)
        self.continuation, self.prompt_len = continuation, prompt_len

    def propose(self, spec, pool):
        for s in spec:
            done = s.request.num_tokens - self.prompt_len
            drafts = self.continuation[done:done + s.num_spec_slots]
            s.draft_token_ids = drafts[:-1] + [(drafts[-1] + 1) % 512]
        return super().propose([], pool)


def test_verified_drafts_advance_the_request_by_what_was_accepted():
    executor, scheduler, model = make()
    prompt = [7, 8, 9, 7, 8, 9, 7, 8]
    continuation = greedy_reference(model, prompt, 40)
    executor.speculator = Speculator(KnownProposer(continuation, len(prompt)), k_max=3, sampler=Sampler(),
                                     adaptive=False)
    request = Request("r", prompt, SamplingParams(temperature=0), max_total_tokens=64)
    scheduler.add(request)
    executor.execute(scheduler.schedule(executor.plan(0, True)).scheduled)
    for _ in range(4):
        before = request.num_tokens
        (scheduled,) = scheduler.schedule(executor.plan(1, False)).scheduled
        assert len(scheduled.draft_token_ids) == 0 and scheduled.num_spec_slots == 3
        (result,) = executor.execute([scheduled])
        assert (result.num_drafts, result.num_accepted) == (3, 2)
        assert request.num_tokens == before + 3 and request.num_computed_tokens == request.num_tokens - 1
        assert result.new_token_ids == scheduled.draft_token_ids[:2] + request.output_token_ids[-1:]
    assert (request.num_draft_tokens, request.num_accepted_tokens) == (12, 8)
    # Lossless: greedy speculation gives exactly the model's argmax continuation.
    assert request.output_token_ids == continuation[:request.num_output_tokens]


def test_seeded_requests_draw_from_their_own_generator():
    outputs = []
    for other_seed in (1, 2):
        executor, scheduler, _ = make()
        mine = Request("mine", [1, 2, 3], SamplingParams(temperature=1.0, seed=5), max_total_tokens=64)
        mine.generator = torch.Generator().manual_seed(5)
        other = Request("other", [4, 5, 6], SamplingParams(temperature=1.0), max_total_tokens=64)
        torch.manual_seed(other_seed)
        for r in (mine, other):
            scheduler.add(r)
        for _ in range(5):
            executor.execute(scheduler.schedule().scheduled)
        outputs.append(mine.output_token_ids)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 5
