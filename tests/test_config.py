"""One configuration: every EngineConfig field is a serve flag, with its help, default and environment variable."""

import argparse
import dataclasses

import pytest

from scheduler import EngineConfig
from server.config import ServerConfig, add_server_args, config_from_args, flag_names


def parse(argv, env=None):
    parser = argparse.ArgumentParser()
    add_server_args(parser, env=env or {})
    return config_from_args(parser.parse_args(argv))


def test_every_engine_field_is_a_serve_flag_with_help_and_the_same_default():
    parser = argparse.ArgumentParser()
    add_server_args(parser, env={})
    actions = {a.dest: a for a in parser._actions}
    engine_fields = dataclasses.fields(EngineConfig)
    assert [f.name for f in engine_fields] == flag_names()[:len(engine_fields)]
    for f in engine_fields:
        action = actions[f.name]
        assert f.metadata["help"] and f.metadata["help"] in action.help, f.name
        shown = f"default: {f.metadata['unset']}]" if "unset" in f.metadata else "default: %(default)s]"
        assert "BEASTSERVE_" + f.name.upper() in action.help and action.help.endswith(shown), f.name
        assert action.default == f.default, f.name
    assert parse([]).engine == EngineConfig()


def test_booleans_turn_both_ways_and_read_the_environment():
    assert parse(["--no-enable-prefix-caching", "--no-adaptive-speculation"]).engine.enable_prefix_caching is False
    assert parse(["--no-adaptive-speculation"]).engine.adaptive_speculation is False
    assert parse(["--no-overlap-scheduling"]).engine.overlap_scheduling is False
    assert parse([], {"BEASTSERVE_ENABLE_PREFIX_CACHING": "false"}).engine.enable_prefix_caching is False
    assert parse([], {"BEASTSERVE_ENFORCE_EAGER": "1"}).engine.enforce_eager is True
    with pytest.raises(ValueError, match="BEASTSERVE_ENFORCE_EAGER='maybe' is not a boolean"):
        parse([], {"BEASTSERVE_ENFORCE_EAGER": "maybe"})


def test_engine_values_reach_the_engine_config_and_errors_name_the_flag():
    config = parse(["--ngram-max", "6", "--speculative", "ngram", "--seed", "7", "--port", "1234"])
    assert (config.engine.ngram_max, config.engine.speculative, config.engine.seed) == (6, "ngram", 7)
    assert config.port == 1234 and isinstance(config, ServerConfig)
    assert parse([], {"BEASTSERVE_NUM_SPECULATIVE_TOKENS": "3"}).engine.num_speculative_tokens == 3
    with pytest.raises(ValueError, match=r"^--max-num-seqs must be an integer >= 1, got 0$"):
        parse(["--max-num-seqs", "0"])


def test_step_limits_are_unset_by_default_and_take_ints_from_flags_and_the_environment():
    assert (parse([]).engine.max_num_seqs, parse([]).engine.max_num_batched_tokens) == (None, None)
    config = parse(["--max-num-seqs", "64", "--max-num-batched-tokens", "4096"]).engine
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (64, 4096)
    config = parse([], {"BEASTSERVE_MAX_NUM_SEQS": "32", "BEASTSERVE_MAX_NUM_BATCHED_TOKENS": "512"}).engine
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (32, 512)
    with pytest.raises(ValueError, match="BEASTSERVE_MAX_NUM_SEQS='many' is not a valid int"):
        parse([], {"BEASTSERVE_MAX_NUM_SEQS": "many"})


def test_help_names_what_an_unset_step_limit_becomes_and_shows_a_value_from_the_environment():
    parser = argparse.ArgumentParser()
    add_server_args(parser, env={"BEASTSERVE_MAX_NUM_BATCHED_TOKENS": "4096"})
    text = " ".join(parser.format_help().split())
    assert "[BEASTSERVE_MAX_NUM_SEQS; default: chosen from the device]" in text
    assert "[BEASTSERVE_MAX_NUM_BATCHED_TOKENS; default: 4096]" in text


def test_the_http_port_is_on_by_default_and_turns_off_by_flag_or_environment():
    assert parse([]).http_port == 8000
    assert parse(["--http-port", "8123"]).http_port == 8123
    assert parse(["--http-port", "off"]).http_port == 0 and parse(["--http-port", "0"]).http_port == 0
    assert parse([], {"BEASTSERVE_HTTP_PORT": "off"}).http_port == 0
    assert parse([], {"BEASTSERVE_HTTP_PORT": "9001"}).http_port == 9001
    with pytest.raises(ValueError, match=r"^--http-port must be in \[0, 65535\], got 70000$"):
        parse(["--http-port", "70000"])
    with pytest.raises(ValueError, match="BEASTSERVE_HTTP_PORT='web' is not a valid Port"):
        parse([], {"BEASTSERVE_HTTP_PORT": "web"})


def test_speculative_best_and_an_eagle_head_directory(tmp_path):
    from server.config import check_available

    config = parse(["--speculative", "best", "--eagle-head", str(tmp_path)]).engine
    assert (config.speculative, config.eagle_head) == ("best", str(tmp_path))
    with pytest.raises(ValueError, match=r"^--eagle-head .*: no head.json there"):
        check_available(config)


def test_stream_interval_is_one_by_default_and_a_bad_one_names_the_flag():
    assert parse([]).stream_interval == 1
    assert parse([], {"BEASTSERVE_STREAM_INTERVAL": "16"}).stream_interval == 16
    for bad in ("0", "1025"):
        with pytest.raises(ValueError, match=rf"^--stream-interval must be in \[1, 1024\], got {bad}$"):
            parse(["--stream-interval", bad])
