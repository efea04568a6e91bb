"""The GGUF model cache: a hit is the fresh parse, byte for byte, without the parser; a changed,
half-written or damaged entry is never trusted; a start says what it does and how long each step took."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from scheduler import LLM, SamplingParams
from scheduler.worker.models import gguf_cache, load_model
from scheduler.worker.models.llama import rope_parameters
from scheduler.worker.runner import kv_zeros
from tests.daemon import Daemon
from tests.tiny_gguf import write_tiny_gguf

CPU = torch.device("cpu")
TEXTS = ["hello there", "the other thing", " a\tb\n\nc ", "<|im_start|>user\nhi<|im_end|>", "ünïcödé ✓"]
CHAT = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "tell me a thing"}]
LOADER = "scheduler.worker.models.loader"


@pytest.fixture
def gguf_file(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def load(path, cache_dir, dtype=torch.float32):
    return load_model(str(path), None, "auto", dtype, CPU, None, str(cache_dir))


def entries(cache_dir):
    return sorted(p for p in cache_dir.iterdir() if not p.name.startswith("."))


def forbid_gguf_parsing(monkeypatch):
    import gguf

    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed")

    monkeypatch.setattr(gguf, "GGUFReader", refuse)
    monkeypatch.setattr("transformers.integrations.gguf.reader.read_gguf_metadata", refuse)


def count_gguf_parses(monkeypatch) -> list:
    import gguf

    opened, original = [], gguf.GGUFReader

    def counting(*args, **kwargs):
        opened.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    return opened


def assert_same_weights(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def assert_same_tokenizer(a, b):
    assert type(a) is type(b)
    assert a.get_vocab() == b.get_vocab()
    assert (a.bos_token, a.eos_token, a.pad_token) == (b.bos_token, b.eos_token, b.pad_token)
    assert a.chat_template == b.chat_template
    for text in TEXTS:
        assert a(text)["input_ids"] == b(text)["input_ids"], text
        assert a.decode(a(text)["input_ids"]) == b.decode(b(text)["input_ids"])
    for prompt in (True, False):
        assert a.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt) == \
            b.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt)
    assert a.apply_chat_template(CHAT, add_generation_prompt=True) == b.apply_chat_template(
        CHAT, add_generation_prompt=True)


def test_a_cache_hit_is_the_fresh_parse_without_the_parser(gguf_file, tmp_path, monkeypatch):
    fresh = load(gguf_file, "off")
    built = load(gguf_file, tmp_path / "cache")
    assert len(entries(tmp_path / "cache")) == 1
    forbid_gguf_parsing(monkeypatch)
    hit = load(gguf_file, tmp_path / "cache")
    for loaded in (built, hit):
        assert loaded.config.to_dict() == fresh.config.to_dict()
        assert loaded.max_positions == fresh.max_positions
        assert_same_weights(loaded, fresh)
        assert_same_tokenizer(loaded.tokenizer, fresh.tokenizer)
    assert fresh.tokenizer.chat_template and "<|im_start|>" in fresh.tokenizer.chat_template


def test_a_cache_hit_generates_the_fresh_parse_tokens_and_logprobs(gguf_file, tmp_path):
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=3, ignore_eos=True)
    prompt = [{"role": "user", "content": "hello there"}]
    outputs = []
    for cache_dir in ("off", tmp_path / "cache", tmp_path / "cache"):  # fresh, build, hit
        llm = LLM(str(gguf_file), cache_dir=str(cache_dir), kv_cache_bytes=1 << 20)
        (out,) = llm.chat([prompt], params)
        outputs.append((out.token_ids, [(lp.token_id, lp.logprob, lp.top) for lp in out.logprobs]))
    assert outputs[0] == outputs[1] == outputs[2]


def test_a_miss_parses_the_gguf_file_once_and_says_it_builds_the_cache(gguf_file, tmp_path, monkeypatch, caplog):
    opened = count_gguf_parses(monkeypatch)
    with caplog.at_level(logging.INFO, logger=LOADER):
        load(gguf_file, tmp_path / "cache")
    assert len(opened) == 1
    assert f"loading tiny from {gguf_file}" in caplog.text
    assert "building the model cache in" in caplog.text


def test_a_hit_logs_each_phase_and_never_parses(gguf_file, tmp_path, monkeypatch, caplog):
    load(gguf_file, tmp_path / "cache")
    forbid_gguf_parsing(monkeypatch)
    with caplog.at_level(logging.INFO, logger=LOADER):
        load(gguf_file, tmp_path / "cache")
    assert "building" not in caplog.text
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded tiny in")]
    for phase in ("resolve", "hash", "config", "tokenizer", "weights", "to-device"):
        assert f"{phase} " in line and " s" in line, phase


def test_a_changed_file_gets_its_own_entry(gguf_file, tmp_path):
    first = load(gguf_file, tmp_path / "cache")
    write_tiny_gguf(gguf_file, seed=1)  # same path, other bytes
    second = load(gguf_file, tmp_path / "cache")
    fresh = load(gguf_file, "off")
    assert len(entries(tmp_path / "cache")) == 2
    assert_same_weights(second, fresh)
    assert not torch.equal(first.model.lm_head.weight, second.model.lm_head.weight)


def test_each_dtype_has_its_own_entry(gguf_file, tmp_path):
    load(gguf_file, tmp_path / "cache", torch.float32)
    hit = load(gguf_file, tmp_path / "cache", torch.bfloat16)
    assert len(entries(tmp_path / "cache")) == 2
    assert_same_weights(hit, load(gguf_file, "off", torch.bfloat16))


def damage_without_manifest(entry):
    (entry / gguf_cache.MANIFEST).unlink()


def damage_truncated_weights(entry):
    weights = entry / gguf_cache.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])


def damage_garbled_weights_header(entry):
    weights = entry / gguf_cache.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\xff" * 32  # same size, an unreadable header
    weights.write_bytes(bytes(data))


def damage_missing_tokenizer(entry):
    (entry / "tokenizer.json").unlink()


def damage_other_transformers_version(entry):
    manifest = json.loads((entry / gguf_cache.MANIFEST).read_text())
    (entry / gguf_cache.MANIFEST).write_text(json.dumps({**manifest, "transformers": "0.0.1"}))


@pytest.mark.parametrize("damage", [damage_without_manifest, damage_truncated_weights, damage_garbled_weights_header,
                                    damage_missing_tokenizer, damage_other_transformers_version])
def test_a_damaged_or_half_written_entry_is_rebuilt_not_trusted(gguf_file, tmp_path, damage, caplog):
    fresh = load(gguf_file, "off")
    load(gguf_file, tmp_path / "cache")
    (entry,) = entries(tmp_path / "cache")
    damage(entry)
    with caplog.at_level(logging.INFO, logger=LOADER):
        rebuilt = load(gguf_file, tmp_path / "cache")
    assert "rebuilding it" in caplog.text and "building the model cache" in caplog.text
    assert_same_weights(rebuilt, fresh)
    assert_same_tokenizer(rebuilt.tokenizer, fresh.tokenizer)
    assert gguf_cache.CacheEntry(entry, gguf_cache.file_sha256(gguf_file)).is_complete()


def test_an_error_of_the_request_is_not_blamed_on_the_entry(gguf_file, tmp_path, caplog):
    load(gguf_file, tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger=LOADER), pytest.raises(ValueError, match="max_model_len"):
        load_model(str(gguf_file), None, "auto", torch.float32, CPU, 10**6, str(tmp_path / "cache"))
    assert "rebuilding" not in caplog.text and "building" not in caplog.text
    assert len(entries(tmp_path / "cache")) == 1


def test_a_temporary_directory_left_by_a_crash_is_not_an_entry(gguf_file, tmp_path):
    cache = tmp_path / "cache"
    digest = gguf_cache.file_sha256(gguf_file)
    (cache / f".{digest}-float32.crashed").mkdir(parents=True)
    loaded = load(gguf_file, cache)
    assert [p.name for p in entries(cache)] == [f"{digest}-float32"]
    assert_same_weights(loaded, load(gguf_file, "off"))


def test_off_keeps_nothing_and_the_default_place_follows_xdg_cache_home(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_cache.default_cache_dir() == tmp_path / "xdg" / "beastserve"
    load(gguf_file, "off")
    assert not (tmp_path / "xdg").exists()
    load_model(str(gguf_file), None, "auto", torch.float32, CPU, None)  # cache_dir None: the default place
    assert len(entries(tmp_path / "xdg" / "beastserve")) == 1


def test_the_rope_tables_are_transformers_own():
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 128, "rope_theta": 500000.0}
    for config in (AutoConfig.for_model("llama", hidden_size=64, num_attention_heads=4),
                   AutoConfig.for_model("llama", hidden_size=64, num_attention_heads=4, rope_parameters=llama3),
                   AutoConfig.for_model("qwen3", hidden_size=64, num_attention_heads=4, head_dim=32)):
        hf = LlamaRotaryEmbedding(config)
        inv_freq, scaling = rope_parameters(config, CPU)
        assert torch.equal(inv_freq, hf.inv_freq) and scaling == hf.attention_scaling


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_cpu_kv_cache_starts_zeroed(dtype):
    cache = kv_zeros((3, 16, 2, 8), dtype, CPU)
    assert cache.shape == (3, 16, 2, 8) and cache.dtype == dtype and cache.is_contiguous()
    assert torch.equal(cache, torch.zeros_like(cache))


def test_a_daemon_started_twice_builds_the_cache_once_and_logs_its_phases(gguf_file, tmp_path):
    logs = []
    for i in range(2):
        daemon = Daemon(gguf_file, "--cache-dir", str(tmp_path / "cache"), log_path=tmp_path / f"start{i}.log")
        try:
            daemon.wait_ready()
        finally:
            daemon.close()
        logs.append(daemon.log_path.read_text())
    for log in logs:
        assert f"loading tiny from {gguf_file}" in log
        assert "loaded tiny in" in log and "ready after" in log and "warm-up" in log
        assert "it/s" not in log  # no progress bars in a log file
    assert "building the model cache" in logs[0]
    assert "building" not in logs[1]
    assert "hash" in logs[1] and "weights" in logs[1] and "to-device" in logs[1]
