"""bench/host_path.py for a few steps: every workload runs with the overlapped loop on and off, the steady window
times decoding steps of every sequence, the whole run generates every asked-for token, and the results files say
so."""

from __future__ import annotations

import json

import pytest

from bench.host_path import main, parse_args


def test_a_short_run_times_every_workload_and_loop(tmp_path):
    out = tmp_path / "host_path.json"
    main(["--num-requests", "12", "--whole-requests", "10", "--min-prompt", "4", "--max-prompt", "40",
          "--output-len", "16", "--window", "4", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [(r["loop"], r["reader"]) for r in result["steady"]] == [("on", "step"), ("on", "end"), ("off", "step"),
                                                                     ("off", "end")]
    for r in result["steady"]:
        assert r["steps"] == 4 and r["sequences"] == 12  # every sequence decodes in every timed step
        assert 0 < r["host_ms_per_step"]["min"] <= r["host_ms_per_step"]["median"]
        assert r["host_us_per_seq"]["mean"] == pytest.approx(1e3 * r["host_ms_per_step"]["mean"] / 12)
    for r in result["whole"]:
        assert r["output_tokens"] == 10 * 16  # EOS ignored
        assert 0 < r["host_s"] < r["wall_s"] + r["model_s"] + 1 and r["host_us_per_seq"] > 0
    markdown = out.with_suffix(".md").read_text()
    assert "overlap on" in markdown and "overlap off" in markdown and "Whole run: 10 requests" in markdown


@pytest.mark.parametrize("argv", [["--loops", "sideways"], ["--window", "0"], ["--whole-requests", "-1"],
                                  ["--readers", "never"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert "error" in capsys.readouterr().err
