import math

import pytest
import torch

from scheduler.core.params import SamplingParams
from scheduler.sampling.batch import SamplingBatch
from scheduler.sampling.sampler import Sampler

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# log of an explicit distribution, shifted to show only differences between logits matter
QUARTERS_LOGITS = [math.log(p) + 3.0 for p in (0.5, 0.25, 0.15, 0.1)]


def make_batch(params, logits, prompts=None, outputs=None, blocked=None, generators=None, device="cpu"):
    num_rows, vocab_size = len(params), len(logits[0])
    return SamplingBatch.build(
        params,
        prompt_token_ids=prompts or [[] for _ in range(num_rows)],
        output_token_ids=outputs or [[] for _ in range(num_rows)],
        generators=generators or [None] * num_rows,
        blocked_token_ids=blocked or [[] for _ in range(num_rows)],
        vocab_size=vocab_size,
        device=torch.device(device),
    )


def probs_of(logits, **kwargs):
    """compute_probs for one row; `prompt` and `output` are its token ids, other kwargs its SamplingParams."""
    batch_kwargs = {f"{key}s": [kwargs.pop(key)] for key in ("prompt", "output") if key in kwargs}
    batch = make_batch([SamplingParams(**kwargs)], [logits], **batch_kwargs)
    return Sampler().compute_probs(torch.tensor([logits]), batch)[0]


def softmax_over(logits, kept):
    """Hand softmax of `logits` restricted to the token ids in `kept`, zero elsewhere."""
    weights = [math.exp(x) if i in kept else 0.0 for i, x in enumerate(logits)]
    return torch.tensor([w / sum(weights) for w in weights])


def assert_probs(actual, expected):
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)


def test_default_params_give_plain_softmax():
    logits = [1.0, 3.0, 2.0, 0.0, -1.0]
    assert_probs(probs_of(logits), softmax_over(logits, kept=range(5)))


def test_temperature_divides_logits():
    logits = [1.0, 3.0, 2.0, 0.0, -1.0]
    assert_probs(probs_of(logits, temperature=0.5), softmax_over([2.0, 6.0, 4.0, 0.0, -2.0], kept=range(5)))
    assert_probs(probs_of(logits, temperature=2.0), softmax_over([0.5, 1.5, 1.0, 0.0, -0.5], kept=range(5)))


def test_top_k_keeps_k_largest_and_renormalises():
    logits = [1.0, 3.0, 2.0, 0.0, -1.0]
    probs = probs_of(logits, top_k=2)
    assert_probs(probs, torch.tensor([0.0, 0.7310586, 0.2689414, 0.0, 0.0]))  # sigmoid(1), sigmoid(-1)
    assert_probs(probs_of(logits, top_k=3), softmax_over(logits, kept={0, 1, 2}))


def test_top_k_at_or_above_vocab_size_is_off():
    logits = [1.0, 3.0, 2.0, 0.0, -1.0]
    assert_probs(probs_of(logits, top_k=5), softmax_over(logits, kept=range(5)))
    assert_probs(probs_of(logits, top_k=50), softmax_over(logits, kept=range(5)))


@pytest.mark.parametrize(("top_p", "expected"), [
    (0.3, [1.0, 0.0, 0.0, 0.0]),  # 0.5 alone already covers 0.3
    (0.7, [2 / 3, 1 / 3, 0.0, 0.0]),  # 0.5 + 0.25 = 0.75 >= 0.7
    (0.8, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0.0]),  # 0.9 >= 0.8
    (0.95, [0.5, 0.25, 0.15, 0.1]),
])
def test_top_p_keeps_smallest_set_reaching_top_p(top_p, expected):
    assert_probs(probs_of(QUARTERS_LOGITS, top_p=top_p), torch.tensor(expected))


def test_top_p_always_keeps_the_top_token():
    logits = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]  # flat: the top token holds far less than any top_p here
    assert_probs(probs_of(logits, top_p=1e-6), torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0]))


@pytest.mark.parametrize(("min_p", "expected"), [
    (0.4, [2 / 3, 1 / 3, 0.0, 0.0]),  # threshold 0.2
    (0.25, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0.0]),  # threshold 0.125
    (1.0, [1.0, 0.0, 0.0, 0.0]),
])
def test_min_p_drops_tokens_below_fraction_of_max(min_p, expected):
    assert_probs(probs_of(QUARTERS_LOGITS, min_p=min_p), torch.tensor(expected))


def test_top_k_applies_before_top_p():
    logits = [math.log(p) for p in (0.4, 0.3, 0.2, 0.1)]
    # top-p alone at 0.5 keeps {0, 1}; after top-k=2 token 0 holds 4/7 >= 0.5 on its own.
    assert_probs(probs_of(logits, top_p=0.5), torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]))
    assert_probs(probs_of(logits, top_k=2, top_p=0.5), torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_temperature_applies_before_top_p():
    logits = [math.log(p) for p in (0.6, 0.3, 0.1)]
    # At temperature 1 token 0 alone covers top_p 0.55; at temperature 3 it holds only ~0.43.
    assert_probs(probs_of(logits, top_p=0.55), torch.tensor([1.0, 0.0, 0.0]))
    hot = [x / 3 for x in logits]
    assert_probs(probs_of(logits, temperature=3.0, top_p=0.55), softmax_over(hot, kept={0, 1}))


def test_repetition_penalty_over_prompt_and_output():
    logits = [2.0, -1.0, 0.5, 1.0, 0.0]
    # token 0 seen in the prompt, token 1 in the output: positive halves, negative doubles
    probs = probs_of(logits, repetition_penalty=2.0, prompt=[0], output=[1, 1])
    assert_probs(probs, softmax_over([1.0, -2.0, 0.5, 1.0, 0.0], kept=range(5)))


def test_repetition_penalty_below_one_rewards_seen_tokens():
    logits = [2.0, -1.0, 0.5, 1.0, 0.0]
    probs = probs_of(logits, repetition_penalty=0.5, prompt=[0, 1], output=[])
    assert_probs(probs, softmax_over([4.0, -0.5, 0.5, 1.0, 0.0], kept=range(5)))


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = [1.0, 1.0, 1.0, 1.0, 1.0]
    probs = probs_of(logits, frequency_penalty=0.5, presence_penalty=1.0, prompt=[0, 0, 4], output=[2, 2, 3])
    # token 2: 1 - (0.5 * 2 + 1); token 3: 1 - (0.5 * 1 + 1); prompt tokens 0 and 4 untouched
    assert_probs(probs, softmax_over([1.0, 1.0, -1.0, -0.5, 1.0], kept=range(5)))


def test_negative_presence_penalty_encourages_repeats():
    logits = [0.0, 0.0, 0.0]
    assert_probs(probs_of(logits, presence_penalty=-2.0, output=[1, 1]), softmax_over([0.0, 2.0, 0.0], kept=range(3)))


def test_penalties_then_temperature_then_top_k():
    logits = [3.0, 1.2, 1.4, 0.0]
    # repetition cuts token 0 to 1.0, so top-k=2 keeps {1, 2} (not {0, 2}); temperature 0.5 doubles
    probs = probs_of(logits, repetition_penalty=3.0, temperature=0.5, top_k=2, output=[0])
    assert_probs(probs, softmax_over([2.0, 2.4, 2.8, 0.0], kept={1, 2}))


@pytest.mark.parametrize("rows", [
    [({"top_k": 2}, []), ({}, [1]), ({"top_k": 3, "min_p": 0.5}, []), ({"temperature": 0.5}, [])],  # top-k, no sort
    [({"top_p": 0.8}, []), ({"top_k": 2}, []), ({"temperature": 0.5, "presence_penalty": 1.0}, [1]), ({}, [])],
])
def test_each_row_uses_its_own_params(rows):
    logits = [1.0, 3.0, 2.0, 0.0, -1.0]
    batch = make_batch([SamplingParams(**kwargs) for kwargs, _ in rows], [logits] * len(rows),
                       outputs=[output for _, output in rows])
    probs = Sampler().compute_probs(torch.tensor([logits] * len(rows)), batch)
    for row, (kwargs, output) in enumerate(rows):
        assert_probs(probs[row], probs_of(logits, output=output, **kwargs))


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_picks_argmax(device):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen).to(device)
    params = [SamplingParams(temperature=0)] * 6
    batch = make_batch(params, logits.tolist(), device=device)
    out = Sampler()(logits, batch)
    assert out.token_ids.tolist() == logits.argmax(dim=-1).tolist()
    probs = Sampler().compute_probs(logits, batch)
    assert probs.sum(dim=-1).tolist() == [1.0] * 6
    assert probs.argmax(dim=-1).tolist() == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_applies_penalties_before_argmax(device):
    logits = torch.tensor([[3.0, 2.5, 0.0], [3.0, 2.5, 0.0]], device=device)
    params = [SamplingParams(temperature=0, presence_penalty=1.0),
              SamplingParams(temperature=0, repetition_penalty=1.1)]
    batch = make_batch(params, logits.tolist(), outputs=[[0], [0]], device=device)
    # presence: 3 - 1 = 2 < 2.5; repetition: 3 / 1.1 = 2.73 > 2.5
    assert Sampler()(logits, batch).token_ids.tolist() == [1, 0]


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_greedy_and_random_rows(device):
    logits = torch.tensor([[0.0, 2.0, 1.0], [0.0, 2.0, 1.0]], device=device)
    batch = make_batch([SamplingParams(temperature=0), SamplingParams(top_k=2)], logits.tolist(), device=device)
    probs = Sampler().compute_probs(logits, batch).cpu()
    assert_probs(probs[0], torch.tensor([0.0, 1.0, 0.0]))
    assert_probs(probs[1], softmax_over([0.0, 2.0, 1.0], kept={1, 2}))


@pytest.mark.parametrize("device", DEVICES)
def test_blocked_tokens_are_never_chosen(device):
    logits = torch.tensor([[0.0, 0.0, 0.0, 10.0, 0.0]] * 4, device=device)
    params = [SamplingParams(temperature=0), SamplingParams(), SamplingParams(top_k=1), SamplingParams(top_p=0.1)]
    batch = make_batch(params, logits.tolist(), blocked=[[3], [3, 0], [3], [3]], device=device)
    sampler = Sampler()
    probs = sampler.compute_probs(logits, batch).cpu()
    assert probs[:, 3].tolist() == [0.0] * 4
    assert probs[1, 0].item() == 0.0
    chosen = torch.stack([sampler(logits, batch).token_ids for _ in range(200)]).cpu()
    assert not (chosen == 3).any()
    assert not (chosen[:, 1] == 0).any()


def seeded_row_tokens(position, num_rows, seed, device="cpu", num_steps=6, vocab_size=64):
    """Tokens the seeded row draws over `num_steps`, placed at `position` among unseeded rows."""
    logits_gen = torch.Generator().manual_seed(99)
    seeded_logits = [torch.randn(vocab_size, generator=logits_gen) * 0.5 for _ in range(num_steps)]
    request_gen = torch.Generator(device=device).manual_seed(seed)
    tokens = []
    for step in range(num_steps):
        logits = torch.randn(num_rows, vocab_size) * 3  # other rows: their own logits, global RNG
        logits[position] = seeded_logits[step]
        params = [SamplingParams(top_k=step % 3) for _ in range(num_rows)]
        params[position] = SamplingParams(temperature=1.0, seed=seed, top_p=0.95)
        generators = [None] * num_rows
        generators[position] = request_gen
        batch = make_batch(params, logits.tolist(), generators=generators, device=device)
        tokens.append(Sampler()(logits.to(device), batch).token_ids[position].item())
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_row_reproducible_whatever_the_batch(device):
    alone = seeded_row_tokens(position=0, num_rows=1, seed=1234, device=device)
    assert seeded_row_tokens(position=0, num_rows=5, seed=1234, device=device) == alone
    assert seeded_row_tokens(position=3, num_rows=5, seed=1234, device=device) == alone
    assert seeded_row_tokens(position=3, num_rows=4, seed=1234, device=device) == alone
    assert seeded_row_tokens(position=0, num_rows=1, seed=4321, device=device) != alone  # the seed does matter
    assert len(set(alone)) > 1  # and the draws are random, not a fixed argmax


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_frequencies_match_compute_probs(device):
    torch.manual_seed(0)
    num_draws, logits_row = 20_000, [1.0, 0.5, 0.0, -0.5, 2.0, -3.0]
    params = [SamplingParams(temperature=0.8, top_k=4, repetition_penalty=1.5)] * num_draws
    logits = torch.tensor([logits_row], device=device).expand(num_draws, -1)
    batch = make_batch(params, [logits_row] * num_draws, outputs=[[4]] * num_draws, device=device)
    sampler = Sampler()
    expected = sampler.compute_probs(logits[:1], make_batch(params[:1], [logits_row], outputs=[[4]], device=device))
    counts = torch.bincount(sampler(logits, batch).token_ids, minlength=len(logits_row)).cpu()
    frequencies = counts / num_draws
    expected = expected[0].cpu()
    assert expected[3] == 0 and expected[5] == 0  # top-k=4 drops the two smallest
    assert counts[expected == 0].sum() == 0
    # 4.5 standard deviations of a frequency near 0.3 over 20k draws
    assert (frequencies - expected).abs().max() < 0.015


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_come_from_raw_logits(device):
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 40, generator=gen) * 2).to(device)
    params = [SamplingParams(logprobs=0), SamplingParams(logprobs=2, top_k=3, presence_penalty=1.0),
              SamplingParams(logprobs=5, min_p=0.2, temperature=0.3)]
    batch = make_batch(params, logits.tolist(), outputs=[[1], [2], [3]], blocked=[[0], [], []], device=device)
    out = Sampler()(logits, batch)
    raw = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids.unsqueeze(1)).squeeze(1))
    top = raw.topk(5, dim=-1)
    assert out.top_logprobs.shape == out.top_token_ids.shape == (3, 5)
    torch.testing.assert_close(out.top_logprobs, top.values)
    assert torch.equal(out.top_token_ids, top.indices)


def test_logprobs_in_float32_for_low_precision_logits():
    logits = torch.tensor([[1.0, 2.5, -0.25, 0.0]], dtype=torch.bfloat16)
    out = Sampler()(logits, make_batch([SamplingParams(temperature=0, logprobs=1)], logits.tolist()))
    assert out.token_ids.tolist() == [1]
    assert out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits.float(), dim=-1)[:, 1])


def test_no_logprobs_when_no_row_asks():
    logits = torch.zeros(2, 4)
    out = Sampler()(logits, make_batch([SamplingParams(), SamplingParams(temperature=0)], logits.tolist()))
    assert out.logprobs is None and out.top_logprobs is None and out.top_token_ids is None


def test_sampling_leaves_callers_logits_untouched():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0]])
    before = logits.clone()
    batch = make_batch([SamplingParams(temperature=0.5, top_k=2, top_p=0.9, repetition_penalty=1.3)],
                       logits.tolist(), outputs=[[1]], blocked=[[0]])
    Sampler()(logits, batch)
    Sampler().compute_probs(logits, batch)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_rows_equal_rows_built_one_per_position(device):
    """Verifying drafts: one row per verified position, copied on the device from the request's row."""
    params = [SamplingParams(temperature=0.7, top_p=0.9, seed=3), SamplingParams(temperature=0),
              SamplingParams(temperature=1.2, top_k=3, min_p=0.05)]
    logits = [QUARTERS_LOGITS] * 3
    gen = torch.Generator(device=device).manual_seed(3)
    per_request = make_batch(params, logits, generators=[gen, None, None], device=device)
    repeats = [3, 1, 2]
    rows = per_request.repeat_rows(repeats)
    expected = make_batch([p for p, n in zip(params, repeats) for _ in range(n)], logits * 2, device=device)
    for field in ("temperature", "is_greedy", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                  "presence_penalty"):
        assert torch.equal(getattr(rows, field), getattr(expected, field)), field
    assert rows.generators == [None] * 6 and rows.seeded_rows == []
    assert (rows.max_top_k, rows.all_greedy, rows.any_greedy, rows.any_top_p) == (3, False, True, True)
    many = torch.tensor([QUARTERS_LOGITS] * 6, device=device)
    assert torch.equal(Sampler().compute_probs(many.clone(), rows), Sampler().compute_probs(many.clone(), expected))


@pytest.mark.parametrize("device", DEVICES)
def test_logit_bias_minus_100_bans_the_greedy_pick_and_plus_100_forces_one(device):
    logits = torch.tensor([QUARTERS_LOGITS] * 3, device=device)
    params = [SamplingParams(temperature=0, logit_bias={0: -100}), SamplingParams(temperature=0, logit_bias={3: 100}),
              SamplingParams(temperature=0)]
    out = Sampler()(logits, make_batch(params, logits.tolist(), device=device))
    assert out.token_ids.tolist() == [1, 3, 0]
    probs = Sampler().compute_probs(logits[:2], make_batch(params[:2], logits.tolist()[:2], device=device))
    assert probs.argmax(dim=-1).tolist() == [1, 3]


def test_logit_bias_shifts_the_distribution_before_temperature():
    bias = {1: 2.0, 2: -1.5}
    biased = [x + bias.get(i, 0.0) for i, x in enumerate(QUARTERS_LOGITS)]
    assert_probs(probs_of(QUARTERS_LOGITS, temperature=0.5, logit_bias=bias),
                 softmax_over([x / 0.5 for x in biased], range(4)))


def test_logprobs_ignore_logit_bias():
    logits = torch.tensor([QUARTERS_LOGITS])
    params = [SamplingParams(temperature=0, logprobs=2, logit_bias={3: 100})]
    out = Sampler()(logits, make_batch(params, logits.tolist()))
    assert out.token_ids.tolist() == [3]
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits, dim=-1)[:, 3])


def test_repeated_rows_keep_each_rows_logit_bias():
    params = [SamplingParams(temperature=0.7, logit_bias={2: 3.0}), SamplingParams(temperature=1.0)]
    per_request = make_batch(params, [QUARTERS_LOGITS] * 2)
    rows = per_request.repeat_rows([2, 1])
    expected = make_batch([params[0], params[0], params[1]], [QUARTERS_LOGITS] * 3)
    many = torch.tensor([QUARTERS_LOGITS] * 3)
    assert torch.equal(Sampler().compute_probs(many.clone(), rows), Sampler().compute_probs(many.clone(), expected))


@pytest.mark.parametrize("kwargs, named", [
    (dict(logit_bias={5: 101.0}), "logit_bias"), (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={5: float("nan")}), "logit_bias"), (dict(logit_bias=[1, 2]), "logit_bias"),
    (dict(prompt_logprobs=21), "prompt_logprobs"), (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
    (dict(truncate_prompt_tokens=-2), "truncate_prompt_tokens")])
def test_bad_new_params_name_their_field(kwargs, named):
    with pytest.raises(ValueError, match=named):
        SamplingParams(**kwargs)
