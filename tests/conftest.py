"""Shared fixtures: tiny random-weight models saved as Hugging Face directories, and the real
default model (loaded once per session, since reading its GGUF file takes half a minute)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _model_cache_in_a_temporary_directory(tmp_path_factory):
    """The default cache place is $XDG_CACHE_HOME/beastserve: tests (and the daemons they start)
    never read or fill the user's own. Removed at the end: an entry of the default model is 540 MB."""
    import shutil

    cache_home = tmp_path_factory.mktemp("xdg-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(cache_home))
    yield cache_home
    patch.undo()
    shutil.rmtree(cache_home, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread_per_process():
    """Here and in every daemon or rank the tests start (they inherit OMP_NUM_THREADS). On a quiet 2-core machine a
    second thread gains nothing (every file takes as long); beside another torch process (a daemon and its client both
    computing, a neighbour on a shared runner) each op waits at a barrier for a thread that lost its core:
    test_parity and test_prompt_options take 22 s instead of 10 s, and beside a heavier neighbour 16 times longer."""
    patch = pytest.MonkeyPatch()
    patch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    patch.undo()


def tiny_config(arch: str = "llama", vocab_size: int = 512, **overrides):
    from transformers import AutoConfig

    fields = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, bos_token_id=None, pad_token_id=None, eos_token_id=None)
    if arch == "qwen3":
        fields["head_dim"] = 16
    fields.update(overrides)
    return AutoConfig.for_model(arch, **fields)


def save_tiny_model(path, config, seed: int = 0, tokenizer=None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    # Random init leaves some logits nearly tied; widen the spread so fp32 rounding never flips an argmax.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def default_tokenizer():
    from scheduler.worker.models import load_tokenizer

    return load_tokenizer("default")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer Llama with a 512-token vocabulary and no tokenizer: token-id prompts only."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = save_tiny_model(path, tiny_config())
    return path, model


@pytest.fixture(scope="session")
def tiny_text_model_dir(tmp_path_factory, default_tokenizer):
    """A 2-layer Llama with the default model's tokenizer and vocabulary, for text-level tests."""
    path = tmp_path_factory.mktemp("tiny-llama-text")
    config = tiny_config(vocab_size=len(default_tokenizer), eos_token_id=default_tokenizer.eos_token_id)
    model = save_tiny_model(path, config, tokenizer=default_tokenizer)
    return path, model


@pytest.fixture(scope="session")
def tiny_text_daemon(tiny_text_model_dir, tmp_path_factory):
    """A daemon on the tiny text model, shared by the test files that only send it requests (one start for all);
    at teardown it must drain and exit 0."""
    from tests.daemon import serve_for_module

    yield from serve_for_module(tiny_text_model_dir[0], tmp_path_factory)


DEFAULT_MODEL_BLOCK_BYTES = 30 * 2 * 3 * 64 * 4 * 16  # layers x (k, v) x kv heads x head dim x fp32 x tokens


@pytest.fixture(scope="session")
def default_llm():
    """The real default model with a deliberately small KV pool (16 blocks) and token budget,
    so ordinary traffic exercises chunked prefill and preemption."""
    from scheduler import LLM

    return LLM("default", dtype="float32", kv_cache_bytes=16 * DEFAULT_MODEL_BLOCK_BYTES, max_num_batched_tokens=48)


@pytest.fixture(scope="session")
def default_hf_model():
    from transformers import AutoModelForCausalLM

    from scheduler.worker.models import default_model_file

    path = default_model_file()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_token_id=None) -> list[int]:
    """What transformers' generate() produces greedily, without the prompt and without padding."""
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id,
                         pad_token_id=eos_token_id if eos_token_id is not None else 0)
    tokens = out[0, len(prompt_ids):].tolist()
    if eos_token_id is not None and eos_token_id in tokens:
        tokens = tokens[:tokens.index(eos_token_id) + 1]
    return tokens


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _release_cuda_memory(request):
    """Each CUDA engine sizes its KV cache from free memory: free the last test's before the next."""
    yield
    if "gpu" in request.keywords and torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()
