"""bench/offline_gpu.py on the CPU with a tiny shape: every system runs, produces exactly the asked-for tokens,
and the results files hold what the GPU run will be read for."""

from __future__ import annotations

import json

import pytest

from bench.offline_common import ENGINE, HF_CONTINUOUS, HF_STATIC
from bench.offline_gpu import check_targets, main, parse_args


def test_tiny_run_writes_consistent_json_and_markdown(tmp_path):
    out = tmp_path / "offline_gpu.json"
    main(["--shapes", "tiny", "--num-requests", "4", "--hf-num-requests", "3", "--min-prompt", "8",
          "--max-prompt", "24", "--output-len", "6", "--hf-batch-size", "2", "--engine-kwargs",
          '{"max_num_seqs": 8}', "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["machine"]["gpu"] and result["machine"]["torch"] and result["machine"]["transformers"]
    assert result["workload"]["engine_kwargs"] == {"max_num_seqs": 8}
    tiny = result["shapes"]["tiny"]
    rows = {r["system"]: r for r in tiny["systems"]}
    assert list(rows) == [HF_STATIC, HF_CONTINUOUS, ENGINE]
    assert [r["requests"] for r in rows.values()] == [3, 3, 4]
    for row in rows.values():
        assert row["output_tokens"] == row["requests"] * 6  # EOS ignored on every side
        assert row["output_tok_s"] == pytest.approx(row["output_tokens"] / row["seconds"])
        assert 0 <= row["setup_s"] < row["seconds"]
    assert tiny["speedup"][HF_CONTINUOUS] == pytest.approx(rows[ENGINE]["output_tok_s"]
                                                           / rows[HF_CONTINUOUS]["output_tok_s"])
    assert tiny["speedup_vs_generate_batch_without_setup"] <= tiny["speedup"][HF_CONTINUOUS]
    for b in tiny["batch1"].values():
        # Only the inputs are checked: a difference of two timings may come out negative on a busy CPU.
        assert (b["prompt_len"], b["output_len"]) == (128, 6) and b["first_token_ms"] > 0 and b["ms_per_token"] > 0
        assert isinstance(b["decode_ms_per_token"], float)
    assert tiny["ttft"]["min_ms"] <= tiny["ttft"]["median_ms"] <= tiny["ttft"]["max_ms"]
    assert tiny["targets"] is None  # only the shapes have targets
    # The whole timed run by step: every output token in one phase or another, every prompt token computed once.
    whole = rows[ENGINE]["breakdown"]
    phases = whole["phases"].values()
    assert sum(p["output_tokens"] for p in phases) == 4 * 6 and whole["preemptions"] == 0
    assert sum(p["prompt_tokens"] for p in phases) >= whole["phases"]["with prompt chunks"]["prompt_tokens"] > 0
    assert whole["prompt_tokens_recomputed"] == 0 and whole["peak_running"] == 4
    assert sum(p["steps"] for p in phases) == whole["steps"] and 0 < whole["seconds"] <= rows[ENGINE]["seconds"]
    markdown = out.with_suffix(".md").read_text()
    for text in (result["machine"]["gpu"], HF_STATIC, HF_CONTINUOUS, ENGINE, "TTFT of a 512-token prompt",
                 "Whole run by step", "decoding, tail"):
        assert text in markdown


def test_targets_judge_the_stricter_ratio_and_upper_bounds():
    result = {"speedup_vs_generate_batch_without_setup": 9.5, "batch1": {ENGINE: {"decode_ms_per_token": 1.4}},
              "ttft": {"median_ms": 16.0}}
    checks = check_targets(result, dict(speedup=10.0, decode_ms=1.5, ttft_ms=15.0))
    assert {k: c["met"] for k, c in checks.items()} == {"speedup": False, "decode_ms": True, "ttft_ms": False}
    del result["speedup_vs_generate_batch_without_setup"]  # --skip-hf
    assert check_targets(result, dict(speedup=10.0))["speedup"]["met"] is None


@pytest.mark.parametrize("argv", [["--shapes", "gpt-9"], ["--output-len", "1"], ["--engine-kwargs", "[1]"],
                                  ["--num-requests", "4", "--hf-num-requests", "5"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_a_failing_peer_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    import bench.offline_gpu as offline_gpu

    def broken(model, max_batch_tokens):
        def generate(prompts, output_len):
            raise RuntimeError("CUDA out of memory")
        return generate

    monkeypatch.setattr(offline_gpu, "hf_continuous", broken)
    out = tmp_path / "o.json"
    main(["--shapes", "tiny", "--num-requests", "2", "--min-prompt", "4", "--max-prompt", "8", "--output-len", "2",
          "--out", str(out)])
    tiny = json.loads(out.read_text())["shapes"]["tiny"]
    failed = next(r for r in tiny["systems"] if r["system"] == HF_CONTINUOUS)
    assert failed["error"] == "RuntimeError: CUDA out of memory"
    assert set(tiny["speedup"]) == {HF_STATIC} and "speedup_vs_generate_batch_without_setup" not in tiny
    assert "failed: RuntimeError: CUDA out of memory" in out.with_suffix(".md").read_text()


def test_device_busy_time_is_the_union_of_overlapping_intervals():
    from bench.gpu_profile import busy_time

    # Two overlapping kernels (0-4 and 2-6 ms), one nested in the first (1-2), a gap, then 8-10: busy 8 of 10 ms.
    ms = 1_000_000
    result = busy_time([(8 * ms, 10 * ms), (0, 4 * ms), (2 * ms, 6 * ms), (1 * ms, 2 * ms)])
    assert result["kernels"] == 4
    assert result["busy_ms"] == pytest.approx(8.0) and result["span_ms"] == pytest.approx(10.0)
    assert result["idle_fraction"] == pytest.approx(0.2)
    assert busy_time([])["idle_fraction"] is None


def test_the_breakdown_puts_each_step_in_its_phase_and_counts_what_preemption_recomputed():
    from bench.run_breakdown import breakdown
    from scheduler.core.outputs import StepStats

    steps = [StepStats(num_running=4, num_prompt_tokens=100, num_generation_tokens=4, step_s=0.5),
             StepStats(num_running=4, num_generation_tokens=4, step_s=0.1, kv_cache_usage=0.9, num_preemptions=1),
             StepStats(num_running=3, num_prompt_tokens=30, num_generation_tokens=3, step_s=0.2),
             StepStats(num_running=2, num_generation_tokens=2, step_s=0.1),
             StepStats(num_running=1, num_generation_tokens=1, step_s=0.05)]
    b = breakdown(steps, prompt_tokens=110)
    assert (b["steps"], b["peak_running"], b["preemptions"], b["prompt_tokens_recomputed"]) == (5, 4, 1, 20)
    phases = b["phases"]
    assert phases["with prompt chunks"]["steps"] == 2 and phases["with prompt chunks"]["seconds"] == 0.7
    assert phases["decoding, full"]["output_tokens"] == 6  # 4 and 2 running: at least half the most
    assert phases["decoding, tail"]["steps"] == 1 and phases["decoding, tail"]["mean_running"] == 1
    assert b["kv_usage_max"] == 0.9 and b["seconds"] == pytest.approx(0.95)
