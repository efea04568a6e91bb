"""EleutherAI's lm-evaluation-harness against the daemon's OpenAI HTTP API, unchanged, as its users run it:
`local-completions` (batches of token-id prompts, echo with logprobs for loglikelihoods) and
`local-chat-completions`, on tiny tasks this test writes, give what lm-eval's `hf` backend gives on the same weights
(transformers, float32): greedy
generations identical, loglikelihoods within 1e-3. The weights and tokenizer are the default model's, from the
HF-style directory of the daemon's model cache: nothing comes from a hub."""

from __future__ import annotations

import json

import pytest
import torch

from tests.daemon import Daemon

MODEL = "SmolLM2-135M-Instruct"
QUESTIONS = [("What is the capital of France?", "Paris"), ("How many legs does a spider have?", "8"),
             ("What colour is the sky on a clear day?", "blue"), ("Write the number after 41.", "42")]
CHOICES = [("The capital of France is", [" Paris", " London", " Rome"], 0),
           ("Two plus two equals", [" four", " five", " seven"], 0),
           ("The opposite of hot is", [" cold", " warm", " blue"], 0),
           ("Water freezes at zero degrees", [" Celsius", " Kelvin", " Newton"], 0)]
MAX_GEN_TOKS = 12
TASKS = {
    "tiny_generate": f"""
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {MAX_GEN_TOKS}
  do_sample: false
  temperature: 0.0
metric_list:
  - metric: exact_match
""",
    "tiny_choice": """
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
""",
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    daemon = Daemon("default", log_path=tmp_path_factory.mktemp("d") / "daemon.log")
    yield daemon.wait_ready(timeout=180)
    assert daemon.close() == 0


@pytest.fixture(scope="module")
def hf_directory(daemon):
    """The daemon's model cache entry (config, tokenizer, de-quantised float32 weights), as the daemon built it."""
    from scheduler.worker.models import default_model_file
    from scheduler.worker.models.gguf_cache import CacheEntry

    entry = CacheEntry.for_file(None, default_model_file(), torch.float32)
    assert entry.is_complete(), f"no model cache entry at {entry.path}"
    return str(entry.path)


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    from lm_eval.tasks import TaskManager

    tmp = tmp_path_factory.mktemp("tasks")
    rows = {"tiny_generate": [{"question": q, "answer": a} for q, a in QUESTIONS],
            "tiny_choice": [{"context": c, "choices": ch, "label": label} for c, ch, label in CHOICES]}
    for name, body in TASKS.items():
        data = tmp / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows[name]))
        # A local JSON file, cached beside it: nothing read from or written to the user's datasets cache.
        head = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                f"  cache_dir: {tmp / 'cache'}\ntest_split: test\n")
        (tmp / f"{name}.yaml").write_text(head + body)
    return TaskManager(include_path=str(tmp))


@pytest.fixture(scope="module")
def hf_results(hf_directory, task_manager):
    """lm-eval's `hf` backend on the same weights: plain text tasks, and the generation task with the chat
    template."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    model = HFLM(pretrained=hf_directory, dtype="float32", device="cpu", batch_size=1)
    plain = simple_evaluate(model, tasks=list(TASKS), task_manager=task_manager)
    chat = simple_evaluate(model, tasks=["tiny_generate"], task_manager=task_manager, apply_chat_template=True)
    return plain, chat


def _samples(results: dict) -> dict[str, list]:
    """Per task, each document's responses (texts, or (loglikelihood, is_greedy) pairs), in document order."""
    return {task: [s["resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
            for task, samples in results["samples"].items()}


def test_local_completions_equals_hf(daemon, hf_directory, task_manager, hf_results):
    from lm_eval import simple_evaluate

    results = simple_evaluate("local-completions", model_args={
        "model": MODEL, "base_url": f"{daemon.http_url}/v1/completions", "tokenizer": hf_directory,
        "tokenizer_backend": "huggingface", "batch_size": 4, "num_concurrent": 2, "max_retries": 1}, tasks=list(TASKS),
        task_manager=task_manager)
    ours, theirs = _samples(results), _samples(hf_results[0])
    assert ours["tiny_generate"] == theirs["tiny_generate"]
    assert any(r[0][0] for r in ours["tiny_generate"])  # the model answered something
    # per document, per choice: [(loglikelihood of the continuation, whether greedy decoding gives it)]
    ll_ours = [resp[0] for doc in ours["tiny_choice"] for resp in doc]
    ll_theirs = [resp[0] for doc in theirs["tiny_choice"] for resp in doc]
    assert len(ll_ours) == sum(len(c) for _, c, _ in CHOICES)
    for (ll, greedy), (want_ll, want_greedy) in zip(ll_ours, ll_theirs):
        assert ll == pytest.approx(want_ll, abs=1e-3) and greedy == want_greedy
    accuracy = results["results"]["tiny_choice"]["acc,none"]
    assert accuracy == hf_results[0]["results"]["tiny_choice"]["acc,none"] and accuracy >= 0.5


def test_local_chat_completions_equals_hf_with_the_chat_template(daemon, task_manager, hf_results):
    from lm_eval import simple_evaluate

    results = simple_evaluate("local-chat-completions", model_args={
        "model": MODEL, "base_url": f"{daemon.http_url}/v1/chat/completions", "num_concurrent": 4,
        "max_retries": 1}, tasks=["tiny_generate"], task_manager=task_manager, apply_chat_template=True)
    ours = _samples(results)["tiny_generate"]
    assert ours == _samples(hf_results[1])["tiny_generate"]
    assert any(r[0][0] for r in ours)


def test_the_remote_tokenizer_needs_no_model_files(daemon, task_manager, hf_results):
    """lm-eval finds /tokenizer_info and /tokenize by itself: no tokenizer argument, no files, same answers."""
    from lm_eval import simple_evaluate

    results = simple_evaluate("local-completions", model_args={
        "model": MODEL, "base_url": f"{daemon.http_url}/v1/completions", "num_concurrent": 4, "max_retries": 1},
        tasks=["tiny_generate"], task_manager=task_manager)
    assert _samples(results)["tiny_generate"] == _samples(hf_results[0])["tiny_generate"]
