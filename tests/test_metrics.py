from __future__ import annotations

import re
import socket
import urllib.request

import pytest
from prometheus_client import generate_latest

from scheduler.core.outputs import StepStats
from server.metrics import METRIC_NAMES, ServerMetrics

MODEL = "tiny-llama"
HISTOGRAMS = {
    "beastserve_time_to_first_token_seconds",
    "beastserve_inter_token_latency_seconds",
    "beastserve_e2e_request_latency_seconds",
    "beastserve_request_queue_time_seconds",
    "beastserve_iteration_tokens",
}


def exercised_metrics() -> ServerMetrics:
    metrics = ServerMetrics(MODEL)
    metrics.record_step(StepStats(num_running=2, num_waiting=1, kv_cache_usage=0.25, num_batched_tokens=40,
                                  num_prompt_tokens=38, num_generation_tokens=2))
    metrics.record_finished("stop", queue_s=0.01, ttft_s=0.05, e2e_s=0.5)
    metrics.record_failure("INVALID_ARGUMENT")
    metrics.record_prompt_received(38)
    metrics.record_spec_decode(num_drafts=1, num_draft_tokens=3, accepted_per_position=[1, 1, 0])
    return metrics


def value(metrics: ServerMetrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, {"model_name": MODEL, **labels})


def assert_exposes_every_name(text: str) -> None:
    for name in METRIC_NAMES:
        kind = "histogram" if name in HISTOGRAMS else "counter" if name.endswith("_total") else "gauge"
        assert f"\n# TYPE {name} {kind}\n" in text, name
        sample = f"{name}_count" if kind == "histogram" else name
        # The exposition sorts labels, so model_name may come after another label.
        assert re.search(rf'^{re.escape(sample)}\{{([^}}]*,)?model_name="{MODEL}"[,}}]', text, re.M), name


def test_metric_names_are_the_vllm_names_with_our_prefix():
    assert set(METRIC_NAMES) == {
        "beastserve_num_requests_running", "beastserve_num_requests_waiting", "beastserve_kv_cache_usage_perc",
        "beastserve_prompt_tokens_total", "beastserve_generation_tokens_total", "beastserve_request_success_total",
        "beastserve_request_failure_total", "beastserve_num_preemptions_total", "beastserve_prefix_cache_queries_total",
        "beastserve_prefix_cache_hits_total", "beastserve_spec_decode_num_drafts_total",
        "beastserve_spec_decode_num_draft_tokens_total", "beastserve_spec_decode_num_accepted_tokens_total",
        "beastserve_spec_decode_num_accepted_tokens_per_pos_total", *HISTOGRAMS,
        "beastserve_prompt_tokens_received_total",  # ours: what clients sent, beside the prefill computed
    }
    assert len(METRIC_NAMES) == len(set(METRIC_NAMES))


def test_exposition_has_every_name_exactly_with_model_label():
    text = generate_latest(exercised_metrics().registry).decode()
    assert_exposes_every_name(text)
    assert "_total_total" not in text


def test_fresh_registry_per_instance():
    # Two instances in one process must not collide on the global registry.
    a, b = ServerMetrics(MODEL), ServerMetrics(MODEL)
    assert a.registry is not b.registry
    a.record_failure("INTERNAL")
    assert value(b, "beastserve_request_failure_total", code="INTERNAL") == 0


def test_common_labelled_series_exist_before_first_event():
    metrics = ServerMetrics(MODEL)
    for reason in ("stop", "length", "abort"):
        assert value(metrics, "beastserve_request_success_total", finished_reason=reason) == 0
    assert value(metrics, "beastserve_request_failure_total", code="RESOURCE_EXHAUSTED") == 0


def test_step_counters_add_and_gauges_follow_the_last_step():
    metrics = ServerMetrics(MODEL)
    metrics.record_step(StepStats(num_running=4, num_waiting=3, kv_cache_usage=0.5, num_batched_tokens=100,
                                  num_prompt_tokens=96, num_generation_tokens=4, num_preemptions=1,
                                  prefix_cache_queries=64, prefix_cache_hits=32))
    metrics.record_step(StepStats(num_running=1, num_waiting=0, kv_cache_usage=0.125, num_batched_tokens=0,
                                  num_prompt_tokens=10, num_generation_tokens=1, prefix_cache_queries=16,
                                  prefix_cache_hits=16))
    assert value(metrics, "beastserve_num_requests_running") == 1
    assert value(metrics, "beastserve_num_requests_waiting") == 0
    assert value(metrics, "beastserve_kv_cache_usage_perc") == 0.125
    assert value(metrics, "beastserve_prompt_tokens_total") == 106
    assert value(metrics, "beastserve_generation_tokens_total") == 5
    assert value(metrics, "beastserve_num_preemptions_total") == 1
    assert value(metrics, "beastserve_prefix_cache_queries_total") == 80
    assert value(metrics, "beastserve_prefix_cache_hits_total") == 48
    # An empty step is not an iteration.
    assert value(metrics, "beastserve_iteration_tokens_count") == 1
    assert value(metrics, "beastserve_iteration_tokens_sum") == 100
    assert value(metrics, "beastserve_iteration_tokens_bucket", le="64.0") == 0
    assert value(metrics, "beastserve_iteration_tokens_bucket", le="128.0") == 1


def test_finished_counts_by_reason_and_observes_latencies():
    metrics = ServerMetrics(MODEL)
    metrics.record_finished("length", queue_s=0.002, ttft_s=0.03, e2e_s=1.5)
    metrics.record_finished("length", queue_s=0.004, ttft_s=0.05, e2e_s=2.5)
    metrics.record_finished("abort", queue_s=0.5, ttft_s=None, e2e_s=0.5)
    assert value(metrics, "beastserve_request_success_total", finished_reason="length") == 2
    assert value(metrics, "beastserve_request_success_total", finished_reason="abort") == 1
    assert value(metrics, "beastserve_request_success_total", finished_reason="stop") == 0
    assert value(metrics, "beastserve_request_queue_time_seconds_count") == 3
    assert value(metrics, "beastserve_e2e_request_latency_seconds_count") == 3
    assert value(metrics, "beastserve_e2e_request_latency_seconds_sum") == pytest.approx(4.5)
    # A request that never produced a token has no time to first token.
    assert value(metrics, "beastserve_time_to_first_token_seconds_count") == 2
    assert value(metrics, "beastserve_time_to_first_token_seconds_sum") == pytest.approx(0.08)


def test_failure_counts_by_grpc_code():
    metrics = ServerMetrics(MODEL)
    metrics.record_failure("INVALID_ARGUMENT")
    metrics.record_failure("INVALID_ARGUMENT")
    metrics.record_failure("FAILED_PRECONDITION")
    assert value(metrics, "beastserve_request_failure_total", code="INVALID_ARGUMENT") == 2
    assert value(metrics, "beastserve_request_failure_total", code="FAILED_PRECONDITION") == 1
    assert value(metrics, "beastserve_request_failure_total", code="INTERNAL") == 0


def test_inter_token_spreads_a_burst_over_its_tokens():
    metrics = ServerMetrics(MODEL)
    metrics.record_inter_token(0.02)
    metrics.record_inter_token(0.012, num_tokens=4)
    assert value(metrics, "beastserve_inter_token_latency_seconds_count") == 5
    assert value(metrics, "beastserve_inter_token_latency_seconds_sum") == pytest.approx(0.032)
    # The burst's tokens count as 3 ms apart, not 12 ms.
    assert value(metrics, "beastserve_inter_token_latency_seconds_bucket", le="0.005") == 4


def test_spec_decode_counts_drafts_and_acceptance_per_position():
    metrics = ServerMetrics(MODEL)
    metrics.record_spec_decode(num_drafts=2, num_draft_tokens=6, accepted_per_position=[2, 1, 0])
    metrics.record_spec_decode(num_drafts=1, num_draft_tokens=4, accepted_per_position=[1, 1, 1, 1])
    assert value(metrics, "beastserve_spec_decode_num_drafts_total") == 3
    assert value(metrics, "beastserve_spec_decode_num_draft_tokens_total") == 10
    assert value(metrics, "beastserve_spec_decode_num_accepted_tokens_total") == 7
    per_pos = [value(metrics, "beastserve_spec_decode_num_accepted_tokens_per_pos_total", position=str(i))
               for i in range(5)]
    assert per_pos == [3, 2, 1, 1, None]


def test_every_draft_position_exists_before_the_first_draft():
    metrics = ServerMetrics(MODEL, num_draft_positions=3)
    per_pos = [value(metrics, "beastserve_spec_decode_num_accepted_tokens_per_pos_total", position=str(i))
               for i in range(4)]
    assert per_pos == [0, 0, 0, None]
    metrics.record_spec_decode(num_drafts=1, num_draft_tokens=4, accepted_per_position=[1, 1, 1, 1])
    assert value(metrics, "beastserve_spec_decode_num_accepted_tokens_per_pos_total", position="3") == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_server_serves_the_registry():
    metrics = exercised_metrics()
    port = free_port()
    metrics.start_http_server(port, host="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            text = response.read().decode()
    finally:
        metrics.close()
    assert_exposes_every_name(text)
    assert f'beastserve_prompt_tokens_total{{model_name="{MODEL}"}} 38.0' in text


def _sample_names(text: str) -> set[str]:
    return {re.match(r"[^{ ]+", line).group() for line in text.splitlines() if line and not line.startswith("#")}


def test_a_scraper_asking_for_openmetrics_stores_the_same_names_as_plain_text():
    # A Prometheus server asks for OpenMetrics; its sample names are what it stores and what the
    # dashboard, alerts, adapter and KEDA queries name.
    metrics = exercised_metrics()
    port = free_port()
    metrics.start_http_server(port, host="127.0.0.1")
    texts = {}
    try:
        for accept in ("text/plain;version=0.0.4", "application/openmetrics-text;version=1.0.0"):
            request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept})
            with urllib.request.urlopen(request, timeout=5) as response:
                assert response.headers["Content-Type"].startswith(accept.split(";")[0])
                texts[accept] = response.read().decode()
    finally:
        metrics.close()
    plain, openmetrics = (_sample_names(t) for t in texts.values())
    ours = {n for n in plain if n.startswith("beastserve")}
    assert ours and ours == {n for n in openmetrics if n.startswith("beastserve")}
    assert all(":" not in name for name in ours)
