"""The command line runs the engine end to end and reports bad options clearly."""

from __future__ import annotations

import argparse

import pytest

from server.cli import build_parser, main
from tests.daemon import free_port


def test_demo_answers_prompts(tiny_text_model_dir, capsys):
    path, _ = tiny_text_model_dir
    assert main(["demo", "--model", str(path), "--prompt", "Hi", "--prompt", "Bye", "--max-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert ">>> Hi" in out and ">>> Bye" in out and "2 answers" in out


def test_demo_reports_bad_model_path(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "missing")]) == 2
    assert "model must be 'default', a GGUF file, a directory" in capsys.readouterr().err


def _parsers():
    """(name, parser) of `beastserve` and of each subcommand, those that parse their own arguments included."""
    from scheduler.distill.command import add_distill_args
    from server.loadgen.load import build_parser as bench_parser

    parser = build_parser()
    yield "beastserve", parser
    for name, sub in parser.subcommands.items():
        yield f"beastserve {name}", sub
    yield "beastserve bench", bench_parser()
    distill = argparse.ArgumentParser()
    add_distill_args(distill)
    yield "beastserve distill-draft", distill


def test_every_flag_has_help_that_shows_its_default():
    lacking = []
    for name, parser in _parsers():
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction) or action.required:
                continue
            help_text = action.help or ""
            if not help_text or ("default" not in help_text and not isinstance(action, argparse._StoreTrueAction)):
                lacking.append(f"{name} {action.option_strings[0]}: {help_text!r}")
    assert not lacking, "\n".join(lacking)


@pytest.mark.parametrize("command", ["generate hi", "chat", "health", "serve"])
def test_an_unknown_flag_prints_the_subcommands_usage(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command.split(), "--no-such-flag"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith(f"usage: beastserve {command.split()[0]} ")
    assert f"beastserve {command.split()[0]}: error: unrecognized arguments: --no-such-flag" in err


@pytest.mark.parametrize("flags, message", [
    (["--max-tokens", "-5"], "stopping.max_tokens: max_tokens must be >= 1, got -5"),
    (["--seed", "-1"], "sampling.seed: seed must be an integer in [0, 2**63), got -1"),
    (["--top-p", "0"], "sampling.top_p: top_p must be in (0, 1], got 0.0"),
])
@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"]])
def test_bad_sampling_flags_are_refused_before_any_call_naming_the_field(command, flags, message, capsys):
    # Nothing listens at the address: the flags are refused before the client would find that out.
    assert main([*command, *flags, "--address", f"127.0.0.1:{free_port()}"]) == 2
    assert capsys.readouterr().err == f"beastserve: {message}\n"


def test_an_empty_prompt_is_refused(capsys):
    assert main(["generate", "", "--chat", "--address", f"127.0.0.1:{free_port()}"]) == 2
    assert capsys.readouterr().err == "beastserve: chat.messages[0].content: must not be empty\n"
    assert main(["generate", "", "--address", f"127.0.0.1:{free_port()}"]) == 2
    assert capsys.readouterr().err == "beastserve: text: the prompt must not be empty\n"


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["health"]])
def test_a_refused_connection_says_no_daemon_runs_there_and_how_to_start_one(command, capsys):
    address = f"127.0.0.1:{free_port()}"
    assert main([*command, "--address", address]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"beastserve: no daemon is running at {address} (connection refused); start one with "
                          "`beastserve serve`")
    assert len(err.splitlines()) == 1


def test_ctrl_c_in_a_real_chat_stops_the_answer_on_the_daemon_and_the_chat_goes_on(default_tokenizer, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from server.client import Client
    from tests.conftest import save_tiny_model, tiny_config
    from tests.daemon import ROOT, Daemon

    # A long context, so an answer runs for seconds unless stopped.
    config = tiny_config(vocab_size=len(default_tokenizer), max_position_embeddings=8192)
    save_tiny_model(tmp_path / "model", config, tokenizer=default_tokenizer)
    daemon = Daemon(tmp_path / "model", log_path=tmp_path / "daemon.log").wait_ready()
    chat = subprocess.Popen([sys.executable, "-m", "server.cli", "chat", "--address", daemon.address,
                             "--temperature", "0"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        with Client(daemon.address, timeout=10) as client:
            chat.stdin.write(b"tell me everything\n")
            chat.stdin.flush()
            assert chat.stdout.read(2) == b"> "
            chat.stdout.read(1)  # the answer has begun
            assert client.load().num_running == 1
            chat.send_signal(signal.SIGINT)
            deadline = time.monotonic() + 10
            while client.load().num_running or client.load().kv_blocks_free != client.load().kv_blocks_total:
                assert time.monotonic() < deadline, "the stopped answer still runs on the daemon"
                time.sleep(0.05)
        out, err = chat.communicate(b"/exit\n", timeout=30)
        assert chat.returncode == 0, err
        assert b"[stopped; not kept in the conversation]\n> " in out  # and the chat asks for the next message
    finally:
        chat.kill()
        daemon.close()
