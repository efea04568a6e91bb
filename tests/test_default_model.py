"""The real default model (SmolLM2-135M-Instruct from its GGUF file) against transformers."""

from __future__ import annotations

from scheduler import SamplingParams
from tests.conftest import hf_greedy
from tests.helpers import assert_pool_idle, run_engine

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "1, 2, 3, 4,",
    "Question: What is the boiling point of water at sea level in degrees Celsius? Explain briefly why it changes "
    "at altitude, and give one example of a city where water boils noticeably below that temperature.\nAnswer:",
    "Translate to French: I would like a cup of coffee, please.",
    "List three primary colors:",
    "Once upon a time, in a small village at the edge of a dark forest, there lived an old woodcutter and his "
    "three children. The eldest was brave, the second was clever, and the youngest, a quiet girl named Mira, "
    "noticed everything that the others missed. One winter the river froze, the mill stopped, and the village "
    "ran short of bread. Every morning",
]
MAX_TOKENS = 24


def test_default_model_greedy_matches_hf_under_pressure(default_llm, default_hf_model):
    """Staggered arrivals, 48-token steps (chunked prefill) and a 16-block pool (preemption)."""
    engine = default_llm.engine
    tok = default_llm.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    assert max(len(p) for p in prompts) > engine.config.max_num_batched_tokens
    eos = engine.eos_token_ids[0]
    expected = [hf_greedy(default_hf_model, p, MAX_TOKENS, eos_token_id=eos) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)

    first = run_engine(engine, prompts, params, arrive_every=1)
    assert [o.token_ids for o in first] == expected
    assert sum(o.metrics.preemptions for o in first) > 0
    assert_pool_idle(engine)

    again = run_engine(engine, prompts, params)
    assert [o.token_ids for o in again] == expected
    assert sum(o.num_cached_tokens for o in again) > 0  # prefix-cache hits from the first round
    assert [o.text for o in again] == [tok.decode(e, skip_special_tokens=True) for e in expected]
    assert_pool_idle(engine)


def test_default_model_chat(default_llm):
    out = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(temperature=0, max_tokens=20))[0]
    assert "Paris" in out.text
