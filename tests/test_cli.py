"""The command line runs the engine end to end and reports bad options clearly."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import pytest

from server.cli import build_parser, main
from server.cli_client import print_stream, summary
from server.client import Client
from tests.daemon import ROOT, free_port, serve_for_module, sigint_by_default

# What only the engine needs: a client command that imports one of these pays seconds for nothing.
# The client's types (scheduler.core.params, .structured, .outputs) import none of these.
ENGINE_MODULES = ("torch", "transformers", "tokenizers", "xgrammar", "numpy", "scheduler.loop",
                  "scheduler.core.request", "scheduler.core.kv_cache", "scheduler.core.scheduler", "scheduler.worker",
                  "scheduler.sampling")


@pytest.fixture(scope="module")
def daemon(default_tokenizer, tmp_path_factory):
    """A tiny model with the default tokenizer and a long context, so an answer runs for seconds unless stopped."""
    from tests.conftest import save_tiny_model, tiny_config

    config = tiny_config(vocab_size=len(default_tokenizer), max_position_embeddings=8192)
    path = tmp_path_factory.mktemp("long-context-model")
    save_tiny_model(path, config, tokenizer=default_tokenizer)
    yield from serve_for_module(path, tmp_path_factory)


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


def test_ctrl_c_in_a_real_chat_stops_the_answer_on_the_daemon_and_the_chat_goes_on(daemon):
    chat = subprocess.Popen([sys.executable, "-m", "server.cli", "chat", "--address", daemon.address,
                             "--temperature", "0"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=sigint_by_default)
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


def imported_modules(*argv: str, stdin: str = "") -> tuple[int, str, set[str]]:
    """Run `beastserve ARGV` in a fresh interpreter: (exit code, stdout, every module it imported)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "server.cli", *argv], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=60)
    modules = {line.rpartition("|")[2].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return proc.returncode, proc.stdout, modules


def test_client_commands_and_help_never_import_the_engine(daemon):
    address = ["--address", daemon.address]
    commands = [(["--help"], ""), (["serve", "--help"], ""), (["generate", "--help"], ""),
                (["health", *address], ""), (["tokenize", "Hi there", *address], ""),
                (["generate", "Hi", "--max-tokens", "3", *address], ""),
                (["chat", "--max-tokens", "3", *address], "Hi\n/exit\n")]
    for argv, stdin in commands:
        code, out, modules = imported_modules(*argv, stdin=stdin)
        assert code == 0 and out, argv
        assert "server.cli_client" in modules  # the import log was read
        engine = sorted(m for m in modules if any(m == e or m.startswith(e + ".") for e in ENGINE_MODULES))
        assert not engine, f"beastserve {' '.join(argv)} imported {engine[:5]}"
    assert imported_modules("tokenize", "Hi there", *address)[1].split() == \
        [str(t) for t in Client(daemon.address).tokenize("Hi there")]


def test_an_answer_cut_inside_a_character_holds_its_bytes_back_and_says_so(daemon, default_tokenizer, capsys):
    lead_byte = default_tokenizer.convert_tokens_to_ids("ð")  # 0xF0: begins a 4-byte character
    genuine = default_tokenizer.convert_tokens_to_ids("ï¿½")  # the bytes of U+FFFD itself
    with Client(daemon.address, timeout=30) as client:
        for stream in (False, True):
            for token, max_tokens, text, held_back in ((lead_byte, 1, "", 1), (lead_byte, 3, "\ufffd\ufffd", 1),
                                                       (genuine, 2, "\ufffd\ufffd", 0)):
                params = dict(max_tokens=max_tokens, temperature=0, logit_bias={token: 100})
                responses = list(client.stream("Hi", **params)) if stream else [client.generate("Hi", **params)]
                assert [t for r in responses for t in r.token_ids] == [token] * max_tokens
                assert "".join(r.text for r in responses) == text
                assert [r.held_back_bytes for r in responses] == [0] * (len(responses) - 1) + [held_back]
        # What the CLI shows of such an answer, from the daemon's own messages.
        answer, last = print_stream(client.stream("Hi", max_tokens=1, temperature=0, logit_bias={lead_byte: 100}),
                                    mark_cut=True)
    assert answer == ""
    assert capsys.readouterr().out == " [length] [the answer ends inside a character: its first 1 bytes are in " \
        "the tokens, not in the text]\n"
    assert summary(last).endswith(" held_back_bytes=1 (the answer ends inside a character: its first 1 bytes are "
                                  "in the tokens, not in the text)")
