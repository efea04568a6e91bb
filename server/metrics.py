"""Prometheus metrics, named like vLLM's with `beastserve_` for `vllm:`, each labelled with `model_name`.

No colon in the names: prometheus-client's OpenMetrics output (what a Prometheus server asks for)
writes a colon in a sample name as `_`, while the plain-text format keeps it, so a name with a
colon would be stored under two names depending on the scraper. Colons are for recording rules.

The request metrics (request_success, request_failure, the latency histograms, prompt_tokens_received) count
generation requests only, each once, as its call ends; not the start-up warm-up, nor Tokenize, GetLoad and the
other calls."""

from __future__ import annotations

import threading
from bisect import bisect_left

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from scheduler.core.outputs import StepStats
from scheduler.core.request import FinishReason

# Spans a fast decode step on a small model (~1 ms) to a long request stuck behind a queue (minutes).
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                         0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0,
                     20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKEN_BUCKETS = tuple(2**i for i in range(14))  # 1 .. 8192

# Pre-created so dashboards show a zero rather than "no data" before the first occurrence.
FINISHED_REASONS = tuple(reason.value for reason in FinishReason)  # stop, length, abort
COMMON_FAILURE_CODES = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNAVAILABLE", "INTERNAL")

_P = "beastserve_"

METRIC_NAMES = (
    f"{_P}num_requests_running",
    f"{_P}num_requests_waiting",
    f"{_P}kv_cache_usage_perc",
    f"{_P}prompt_tokens_total",
    f"{_P}prompt_tokens_received_total",
    f"{_P}generation_tokens_total",
    f"{_P}request_success_total",
    f"{_P}request_failure_total",
    f"{_P}num_preemptions_total",
    f"{_P}prefix_cache_queries_total",
    f"{_P}prefix_cache_hits_total",
    f"{_P}spec_decode_num_drafts_total",
    f"{_P}spec_decode_num_draft_tokens_total",
    f"{_P}spec_decode_num_accepted_tokens_total",
    f"{_P}spec_decode_num_accepted_tokens_per_pos_total",
    f"{_P}time_to_first_token_seconds",
    f"{_P}inter_token_latency_seconds",
    f"{_P}e2e_request_latency_seconds",
    f"{_P}request_queue_time_seconds",
    f"{_P}iteration_tokens",
)


class ServerMetrics:
    """The daemon's metrics, kept in `self.registry` (a fresh one unless given; never the global)."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None, num_draft_positions: int = 0):
        self.model_name = model_name
        self.registry = registry if registry is not None else CollectorRegistry()
        self._http_server = None

        def gauge(name, doc):
            return Gauge(_P + name, doc, ["model_name"], registry=self.registry).labels(model_name)

        # prometheus-client appends `_total` to counter names itself.
        def counter(name, doc, *labels):
            metric = Counter(_P + name, doc, ["model_name", *labels], registry=self.registry)
            return metric if labels else metric.labels(model_name)

        def histogram(name, doc, buckets):
            return Histogram(_P + name, doc, ["model_name"], buckets=buckets, registry=self.registry).labels(model_name)

        # Children are bound to model_name once here, so the per-step path does no label lookups.
        self.num_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Share of KV-cache blocks in use, 0..1.")

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens computed in prefill: prefix-cache hits excluded, "
                                     "recomputation after preemption included. What clients sent is "
                                     "prompt_tokens_received.")
        self.prompt_tokens_received = counter(
            "prompt_tokens_received", "Prompt tokens of the generation requests accepted, as the engine ran them "
            "(after truncate_prompt_tokens), once per request whatever its n: what clients are billed for. The prefill "
            "actually computed is prompt_tokens.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.num_preemptions = counter("num_preemptions", "Requests preempted to free KV-cache blocks.")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Tokens found in the prefix cache.")
        self._request_success = counter("request_success", "Requests finished, by finish reason.", "finished_reason")
        self._request_failure = counter("request_failure", "Requests failed, by gRPC status code.", "code")
        self.spec_drafts = counter("spec_decode_num_drafts", "Speculative drafts proposed.")
        self.spec_draft_tokens = counter("spec_decode_num_draft_tokens", "Speculative draft tokens proposed.")
        self.spec_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Speculative draft tokens accepted.")
        self._spec_accepted_per_pos = counter("spec_decode_num_accepted_tokens_per_pos",
                                              "Speculative draft tokens accepted, by draft position.", "position")
        self._accepted_at: list = []  # children of _spec_accepted_per_pos, one per draft position

        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS_S)
        # Observed for every token the daemon streams: a histogram that takes a step's tokens in one call.
        self.inter_token = CountedHistogram(_P + "inter_token_latency_seconds", "Time between output tokens.",
                                            model_name, INTER_TOKEN_BUCKETS_S, self.registry)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", REQUEST_BUCKETS_S)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled.", REQUEST_BUCKETS_S)
        self.iteration_tokens = histogram("iteration_tokens", "Tokens computed per engine step.",
                                          ITERATION_TOKEN_BUCKETS)

        for reason in FINISHED_REASONS:
            self._request_success.labels(model_name, reason)
        for code in COMMON_FAILURE_CODES:
            self._request_failure.labels(model_name, code)
        # rate() misses a counter's first increase when its series appears with it: a new pod's first
        # accepted drafts would not show, so every position the engine can draft exists from the start.
        self._add_draft_positions(num_draft_positions)

    def record_step(self, stats: StepStats) -> None:
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        self.num_preemptions.inc(stats.num_preemptions)
        self.prefix_cache_queries.inc(stats.prefix_cache_queries)
        self.prefix_cache_hits.inc(stats.prefix_cache_hits)
        if stats.num_batched_tokens > 0:
            self.iteration_tokens.observe(stats.num_batched_tokens)

    def record_finished(self, finished_reason: str, queue_s: float, ttft_s: float | None, e2e_s: float) -> None:
        """A request ended without error. `ttft_s` is None when it produced no token (e.g. cancelled early)."""
        self._request_success.labels(self.model_name, finished_reason).inc()
        self.queue_time.observe(queue_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        self.e2e.observe(e2e_s)

    def record_prompt_received(self, num_tokens: int) -> None:
        """A generation request was accepted with this many prompt tokens."""
        self.prompt_tokens_received.inc(num_tokens)

    def record_inter_token(self, seconds: float, num_tokens: int = 1) -> None:
        """`num_tokens` arrived together after `seconds`: each counts as seconds/num_tokens apart."""
        assert num_tokens >= 1, num_tokens
        self.inter_token.observe(seconds / num_tokens, num_tokens)

    def record_failure(self, code: str) -> None:
        """A request failed; `code` is the gRPC status code name, e.g. "INVALID_ARGUMENT"."""
        self._request_failure.labels(self.model_name, code).inc()

    def record_spec_decode(self, num_drafts: int, num_draft_tokens: int, accepted_per_position: list[int]) -> None:
        """One step's speculation: accepted_per_position[i] tokens were accepted at draft position i."""
        self.spec_drafts.inc(num_drafts)
        self.spec_draft_tokens.inc(num_draft_tokens)
        self.spec_accepted_tokens.inc(sum(accepted_per_position))
        self._add_draft_positions(len(accepted_per_position))
        for child, accepted in zip(self._accepted_at, accepted_per_position):
            child.inc(accepted)

    def _add_draft_positions(self, num_positions: int) -> None:
        while len(self._accepted_at) < num_positions:
            self._accepted_at.append(self._spec_accepted_per_pos.labels(self.model_name, str(len(self._accepted_at))))

    def start_http_server(self, port: int, host: str = "0.0.0.0") -> None:
        """Serve this registry at http://host:port/metrics from a daemon thread."""
        assert self._http_server is None, "metrics HTTP server already started"
        self._http_server, _ = prometheus_client.start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        """Stop the HTTP server, if started."""
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None


class CountedHistogram:
    """A histogram of one label value (model_name) whose observe() takes a value and how many times it was seen:
    the same samples as prometheus-client's Histogram (buckets, count, sum; no `_created`), at a lookup and two
    additions a call, where Histogram.observe costs some microseconds a value (its locks, checks and exemplars)
    and a burst of n tokens would take n calls. Registered as a custom collector."""

    def __init__(self, name: str, doc: str, model_name: str, buckets: tuple[float, ...], registry: CollectorRegistry):
        self.name, self.doc, self.model_name = name, doc, model_name
        self.bounds = [float(b) for b in buckets] + [float("inf")]
        self.counts = [0] * len(self.bounds)  # observations in each bucket alone; cumulative when collected
        self.sum = 0.0
        self._lock = threading.Lock()  # the engine thread observes while a scrape collects
        registry.register(self)

    def observe(self, value: float, count: int = 1) -> None:
        i = bisect_left(self.bounds, value)  # the first bound >= value: Prometheus's `le`
        with self._lock:
            self.counts[i] += count
            self.sum += value * count

    def describe(self):
        return [HistogramMetricFamily(self.name, self.doc, labels=["model_name"])]

    def collect(self):
        with self._lock:
            counts, total = list(self.counts), self.sum
        family = HistogramMetricFamily(self.name, self.doc, labels=["model_name"])
        cumulative, buckets = 0, []
        for bound, n in zip(self.bounds, counts):
            cumulative += n
            buckets.append((floatToGoString(bound), cumulative))
        family.add_metric([self.model_name], buckets, total)
        return [family]


class RequestTally:
    """What one generation call adds to the request metrics: its prompt tokens once the engine has taken it
    (its first output), and how it finished once the call completes (the last completion's output)."""

    def __init__(self, metrics: ServerMetrics | None):
        self.metrics = metrics
        self.received = False
        self.produced = False  # any token: a time to first token exists
        self.last = None  # the last completion's finished output

    def observe(self, output) -> None:
        if not self.received and self.metrics is not None:
            self.metrics.record_prompt_received(output.num_prompt_tokens)
        self.received = True
        self.produced = self.produced or bool(output.token_ids)
        if output.finished:
            self.last = output

    def completed(self) -> None:
        """The call answered in full."""
        if self.metrics is None or self.last is None or self.last.metrics is None:
            return
        m = self.last.metrics
        self.metrics.record_finished(self.last.finish_reason, m.queue_s, m.ttft_s if self.produced else None,
                                     m.e2e_s)
