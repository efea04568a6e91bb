"""The command line runs the engine end to end and reports bad options clearly."""

from __future__ import annotations

from server.cli import main


def test_demo_answers_prompts(tiny_text_model_dir, capsys):
    path, _ = tiny_text_model_dir
    assert main(["demo", "--model", str(path), "--prompt", "Hi", "--prompt", "Bye", "--max-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert ">>> Hi" in out and ">>> Bye" in out and "2 answers" in out


def test_demo_reports_bad_model_path(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "missing")]) == 2
    assert "model must be 'default', a GGUF file or a directory" in capsys.readouterr().err
