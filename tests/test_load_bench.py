"""The load generator: arrivals have the asked-for rate and burstiness, goodput counts only requests meeting every SLO,
a run against a real (tiny) daemon reports numbers that agree with each other, and the same load over the OpenAI API
(the daemon behind the real smg gateway) reports the same things in the same shape."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from server import cli
from server.loadgen.backends import spread_tokens
from server.loadgen.load import Record, arrival_intervals, main, summarize
from tests.daemon import Daemon
from tests.gateway import Gateway

SERVED_MODEL = "tiny-llama"


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_arrival_gaps_have_mean_one_over_rate_and_gamma_spread(burstiness):
    gaps = arrival_intervals(40_000, 4.0, burstiness, np.random.default_rng(0))
    assert gaps.mean() == pytest.approx(1 / 4.0, rel=0.03)
    # A gamma of shape k has coefficient of variation 1/sqrt(k): 1 for Poisson, more when bursty.
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_infinite_rate_sends_everything_at_once():
    assert not arrival_intervals(5, math.inf, 1.0, np.random.default_rng(0)).any()


def test_goodput_counts_only_requests_meeting_every_slo():
    records = [Record(prompt_tokens=4, output_tokens=11, ttft=0.1, e2e=1.1),  # TPOT 100 ms
               Record(prompt_tokens=4, output_tokens=11, ttft=0.3, e2e=1.3),  # TTFT over 200 ms
               Record(prompt_tokens=4, output_tokens=11, ttft=0.1, e2e=2.1),  # TPOT 200 ms
               Record(prompt_tokens=4, output_tokens=1, ttft=0.1, e2e=0.1),  # no TPOT: meets any TPOT SLO
               Record(prompt_tokens=4, error="UNAVAILABLE")]  # fast, but failed
    assert summarize(records, 2.0, {"ttft": 200, "tpot": 150})["goodput"] == 2 / 2.0
    assert summarize(records, 2.0, {"ttft": 200})["goodput"] == 3 / 2.0
    assert summarize(records, 2.0, {"e2e": 1200})["goodput"] == 2 / 2.0
    assert summarize(records, 2.0, None)["goodput"] is None


def test_summary_counts_failures_by_code_and_skips_one_token_answers_in_tpot():
    records = [Record(prompt_tokens=4, output_tokens=1, ttft=0.1, e2e=0.1),
               Record(prompt_tokens=4, output_tokens=3, ttft=0.1, e2e=0.5, itl=[0.2, 0.2]),
               Record(prompt_tokens=4, error="RESOURCE_EXHAUSTED"), Record(prompt_tokens=4, error="RESOURCE_EXHAUSTED")]
    summary = summarize(records, 1.0, None)
    assert (summary["completed"], summary["failed"]) == (2, 2)
    assert summary["failures"] == {"RESOURCE_EXHAUSTED": 2}
    assert summary["tpot_ms"]["mean"] == pytest.approx(200.0)
    assert summary["total_token_throughput"] == 8 + 4


@pytest.fixture(scope="module")
def daemon(tiny_text_model_dir, tmp_path_factory):
    path, _ = tiny_text_model_dir
    d = Daemon(path, "--served-model-name", SERVED_MODEL, log_path=tmp_path_factory.mktemp("log") / "daemon.log")
    yield d.wait_ready()
    assert d.close() == 0


def test_short_run_reports_consistent_numbers(daemon, tmp_path, capsys):
    out_json, out_md = tmp_path / "load.json", tmp_path / "load.md"
    assert main(["--address", daemon.address, "--num-requests", "8", "--request-rate", "inf", "--input-len", "16",
                 "--output-len", "8", "--ignore-eos", "--no-progress", "--out-json", str(out_json),
                 "--out-md", str(out_md)]) == 0
    result = json.loads(out_json.read_text())
    (row,) = result["passes"]
    assert (row["request_rate"], row["completed"], row["failed"], row["failures"]) == ("inf", 8, 0, {})
    assert row["total_output_tokens"] == 8 * 8  # EOS ignored: exactly max_tokens each
    assert row["total_input_tokens"] >= 8 * 16
    assert row["request_throughput"] == pytest.approx(8 / row["duration_s"])
    assert row["output_throughput"] == pytest.approx(row["total_output_tokens"] / row["duration_s"])
    assert row["total_token_throughput"] == pytest.approx(
        (row["total_input_tokens"] + row["total_output_tokens"]) / row["duration_s"])
    for name in ("ttft", "tpot", "itl", "e2e"):
        d = row[f"{name}_ms"]
        assert 0 < d["median"] <= d["p90"] <= d["p99"], name
    assert row["ttft_ms"]["p99"] <= row["e2e_ms"]["p99"]
    # Every request's ITL entries cover its tokens after the first, so their mean is the mean TPOT but for the
    # wait between a request's last token and the end of its stream, which TPOT includes (as vLLM's does): on a
    # busy 2-core machine that wait is a few percent of an 8-token answer.
    assert row["tpot_ms"]["mean"] * 0.85 <= row["itl_ms"]["mean"] <= row["tpot_ms"]["mean"] * 1.01
    assert out_md.read_text() in capsys.readouterr().out


def test_sweep_of_jsonl_chat_requests_plots_one_pass_per_rate(daemon, tmp_path):
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text('{"prompt": "Hello there", "output_len": 3}\n\n{"prompt": "Write a poem"}\n')
    out_json, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    assert main(["--address", daemon.address, "--dataset", "jsonl", "--dataset-path", str(dataset), "--chat",
                 "--ignore-eos", "--output-len", "5", "--num-requests", "4", "--warmup-requests", "0",
                 "--sweep", "50,inf", "--burstiness", "0.5", "--max-concurrency", "2", "--goodput", "e2e:60000",
                 "--no-progress", "--out-json", str(out_json), "--plot", str(png)]) == 0
    passes = json.loads(out_json.read_text())["passes"]
    assert [p["request_rate"] for p in passes] == ["50", "inf"]
    for p in passes:
        assert (p["completed"], p["total_output_tokens"]) == (4, 3 + 5 + 3 + 5)
        assert p["goodput"] == pytest.approx(p["request_throughput"])  # a minute meets every request
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_reports_refused_requests_by_status_code(daemon, tmp_path):
    out_json = tmp_path / "refused.json"
    # The tiny model's context is 512 tokens: 1000 output tokens can never fit, so the daemon refuses each.
    assert cli.main(["bench", "--address", daemon.address, "--num-requests", "2", "--output-len", "1000",
                     "--warmup-requests", "0", "--no-progress", "--out-json", str(out_json)]) == 0
    (row,) = json.loads(out_json.read_text())["passes"]
    assert (row["completed"], row["failed"], row["failures"]) == (0, 2, {"INVALID_ARGUMENT": 2})
    assert row["ttft_ms"] is None and row["output_throughput"] == 0


def test_comparison_puts_runs_side_by_side_with_throughput_ratio_to_the_first():
    from server.loadgen.report import compare_markdown

    def run(output_tokens: int, note: str) -> dict:
        records = [Record(prompt_tokens=4, output_tokens=output_tokens, ttft=0.1, e2e=1.0)]
        passes = [dict(request_rate=rate, **summarize(records, 1.0, None)) for rate in ("4", "inf")]
        return dict(machine=dict(date="today", cpu="cpu", logical_cores=2), server=dict(model="m"), note=note,
                    passes=passes)

    markdown = compare_markdown({"off": run(10, "plain"), "ngram": run(20, "drafts")}, "Serving load on X")
    rows = [line for line in markdown.splitlines() if line.startswith(("| 4 ", "| inf "))]
    assert [row.split(" | ")[:2] for row in rows] == [["| 4", "off"], ["| 4", "ngram"], ["| inf", "off"],
                                                      ["| inf", "ngram"]]
    assert "| 20.0 (2.00x) |" in rows[1] and "| 10.0 |" in rows[0]
    assert "- ngram: drafts" in markdown and markdown.startswith("# Serving load on X")


@pytest.mark.parametrize(("chunk_times", "output_tokens", "tokens_per_chunk"), [
    ([1.0, 2.0, 3.0], 3, [1, 1, 1]),  # one token a chunk: exact
    ([1.0, 2.0, 3.0], 8, [1, 4, 3]),  # the first taken as one; the rest shared as evenly as whole tokens go
    ([1.0], 5, [5]),  # everything in one chunk, like a gRPC message of five tokens
    ([], 0, []),
])
def test_http_chunks_share_the_usage_count_of_tokens(chunk_times, output_tokens, tokens_per_chunk):
    spread = spread_tokens(chunk_times, output_tokens)
    assert [n for _, n in spread] == tokens_per_chunk and [t for t, _ in spread] == chunk_times
    assert sum(tokens_per_chunk) == output_tokens


@pytest.fixture(scope="module")
def gateway(daemon, tmp_path_factory):
    g = Gateway([daemon.address], log_path=tmp_path_factory.mktemp("log") / "gateway.log")
    try:
        g.wait_ready(SERVED_MODEL)
    except BaseException:
        g.close()
        raise
    yield g
    assert g.close() == 0


def run_load(out_json, *flags: str) -> dict:
    assert main(["--num-requests", "6", "--request-rate", "inf", "--input-len", "16", "--output-len", "8",
                 "--ignore-eos", "--no-progress", "--out-json", str(out_json), *flags]) == 0
    return json.loads(out_json.read_text())


def shape(value):
    """The keys at every level, the values left out."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return "value"


def table_shape(markdown: str) -> list[str]:
    return [re.sub(r"\d[\d.,]*", "#", line) for line in markdown.splitlines() if line.startswith("|")]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_openai_backend_through_the_gateway_reports_like_grpc(daemon, gateway, chat, tmp_path):
    chat_flags = ["--chat"] if chat else []
    http = run_load(tmp_path / "http.json", "--backend", "openai", "--base-url", gateway.base_url, *chat_flags)
    grpc_run = run_load(tmp_path / "grpc.json", "--address", daemon.address, *chat_flags)
    assert http["server"] == dict(backend="openai", address=gateway.base_url, model=SERVED_MODEL,
                                  max_model_len=None)  # smg's /models does not give it
    assert grpc_run["server"] == dict(backend="grpc", address=daemon.address, model=SERVED_MODEL, max_model_len=512)
    (row,) = http["passes"]
    assert (row["completed"], row["failed"]) == (6, 0)
    assert row["total_output_tokens"] == 6 * 8  # EOS ignored: exactly max_tokens each, by the server's usage
    assert row["total_input_tokens"] == grpc_run["passes"][0]["total_input_tokens"]  # the same prompts, same count
    for name in ("ttft", "tpot", "itl", "e2e"):
        d = row[f"{name}_ms"]
        assert 0 < d["median"] <= d["p90"] <= d["p99"] < 60_000, name
    assert row["ttft_ms"]["p99"] <= row["e2e_ms"]["p99"]
    # ITL spans first to last content chunk; TPOT also the tail to the stream's end (the usage chunk).
    assert 0.5 * row["tpot_ms"]["mean"] <= row["itl_ms"]["mean"] <= row["tpot_ms"]["mean"]
    assert shape(http) == shape(grpc_run)
    from server.loadgen.report import to_markdown

    assert table_shape(to_markdown(http)) == table_shape(to_markdown(grpc_run))


def test_openai_backend_reports_refused_requests_by_http_status(gateway, tmp_path):
    out_json = tmp_path / "refused.json"
    # 1000 output tokens never fit the tiny model's 512-token context: the gateway answers 400 for each.
    assert main(["--backend", "openai", "--base-url", gateway.base_url, "--model", SERVED_MODEL, "--num-requests",
                 "2", "--output-len", "1000", "--warmup-requests", "0", "--no-progress",
                 "--out-json", str(out_json)]) == 0
    (row,) = json.loads(out_json.read_text())["passes"]
    assert (row["completed"], row["failed"], row["failures"]) == (0, 2, {"HTTP 400": 2})


def test_openai_backend_refuses_a_model_the_server_does_not_list(gateway, capsys):
    assert main(["--backend", "openai", "--base-url", gateway.base_url, "--model", "no-such-model",
                 "--no-progress"]) == 2
    assert "--model 'no-such-model' is not served" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--base-url", "http://x/v1"], ["--model", "m"],
                                  ["--backend", "openai", "--token-ids"],
                                  ["--backend", "openai", "--tls-ca-file", "ca.pem"]])
def test_flags_of_the_other_backend_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "backend" in capsys.readouterr().err
