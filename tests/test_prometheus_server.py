"""Every query deploy/ ships, evaluated by a real Prometheus server that scraped a live daemon after traffic:
the dashboard's panels and variables, the alerting and recording rules, the prometheus-adapter rules and
the KEDA trigger all return data, under the names a scraper stores whichever format it negotiates.

Needs the `prometheus` binary (on PATH or in the venv's bin; `make deploy-tools` puts it there): without
it these tests fail, they never skip."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

import grpc
import promql_parser
import pytest
import yaml

from server.proto.beastserve.v1 import generate_pb2 as pb
from tests.daemon import Daemon, free_port, generation_stub
from tests.test_deploy import DEPLOY, K8S, load_yaml, queried_exprs, selector_names, tool

RULES = DEPLOY / "prometheus/alerts.yaml"
ADAPTER_RULES = load_yaml(K8S / "prometheus-adapter-rules.yaml")["rules"]
# The labels the Prometheus Operator puts on what it scrapes through the ServiceMonitor, which the rules,
# the adapter and KEDA select on. Two jobs scrape the one daemon, as if it were two replicas.
NAMESPACE, SERVICE = "beastserve", "beastserve"
OPENMETRICS_JOB, TEXT_JOB = "beastserve", "beastserve-text"
PODS = {OPENMETRICS_JOB: "beastserve-0", TEXT_JOB: "beastserve-1"}
# Alert conditions on series that come from elsewhere than the daemon, so no scrape here can produce them;
# alerts_test.yaml tests the rules on them.
NOT_THE_DAEMONS = {
    "kube_deployment_status_replicas_available": "kube-state-metrics' series of the Deployment's ready pods",
}
PROMPT = list(range(1, 41))  # longer than a KV block, so the repeats hit the prefix cache


class TextProxy:
    """Serves the daemon's /metrics as the Prometheus text format 0.0.4 whatever the scraper asks for:
    Prometheus 2.42 (Debian's) has no scrape_protocols setting and always prefers OpenMetrics."""

    def __init__(self, metrics_url: str):
        self.accepts: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                proxy.accepts.append(self.headers.get("Accept", ""))
                request = urllib.request.Request(metrics_url, headers={"Accept": "text/plain;version=0.0.4"})
                with urllib.request.urlopen(request, timeout=5) as response:
                    body, content_type = response.read(), response.headers["Content-Type"]
                assert content_type.startswith("text/plain"), content_type
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def prometheus_config(metrics_address: str, proxy_address: str) -> dict:
    def job(name: str, address: str) -> dict:
        labels = {"namespace": NAMESPACE, "service": SERVICE, "pod": PODS[name]}
        return {"job_name": name, "static_configs": [{"targets": [address], "labels": labels}]}

    return {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(RULES)],
            "scrape_configs": [job(OPENMETRICS_JOB, metrics_address), job(TEXT_JOB, proxy_address)]}


class Prometheus:
    def __init__(self, config: dict, tmp_path):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = tmp_path / "prometheus.log"
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=self.log_file, stderr=subprocess.STDOUT)

    def log(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text()

    def get(self, path: str, **params) -> dict:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["result"]

    def wait_until(self, condition, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"prometheus exited with {self.proc.returncode}:\n{self.log()}"
            try:
                if condition():
                    return
            except OSError:  # not listening yet
                pass
            assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{self.log()}\n{self.scrape_errors()}"
            time.sleep(0.2)

    def scrape_errors(self) -> str:
        targets = self.get("/api/v1/targets")["activeTargets"]
        return "\n".join(f"{t['scrapeUrl']}: {t['lastError']}" for t in targets if t["lastError"])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()


@pytest.fixture(scope="module")
def daemon(tiny_model_dir, tmp_path_factory):
    path, _ = tiny_model_dir
    # A draft model that is the target itself: every step drafts, so the speculative panels have data.
    daemon = Daemon(path, "--speculative", "draft", "--draft-model", str(path),
                    log_path=tmp_path_factory.mktemp("prometheus-daemon") / "daemon.log")
    try:
        yield daemon.wait_ready()
    finally:
        assert daemon.close() == 0, daemon.log()


@pytest.fixture(scope="module")
def text_proxy(daemon):
    proxy = TextProxy(f"http://127.0.0.1:{daemon.metrics_port}/metrics")
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def stub(daemon):
    yield from generation_stub(daemon)


def request(max_tokens: int, **stopping) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), sampling=pb.SamplingParams(temperature=0),
                              stopping=pb.StoppingCriteria(max_tokens=max_tokens, **stopping))


def send_traffic(stub) -> int:
    """Unary and streaming requests, one refused and one cancelled by its client; the number that succeed."""
    for _ in range(2):
        assert len(stub.Generate(request(8, ignore_eos=True)).token_ids) == 8
        assert sum(len(c.token_ids) for c in stub.GenerateStream(request(8, ignore_eos=True))) == 8
    with pytest.raises(grpc.RpcError) as refused:
        stub.Generate(request(0))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stream = stub.GenerateStream(request(400, ignore_eos=True))
    next(stream)
    stream.cancel()
    return 4


@pytest.fixture(scope="module")
def prometheus(daemon, text_proxy, stub, tmp_path_factory):
    config = prometheus_config(f"127.0.0.1:{daemon.metrics_port}", text_proxy.address)
    server = Prometheus(config, tmp_path_factory.mktemp("prometheus"))
    try:
        server.wait_until(lambda: len(server.query("up == 1")) == 2, "scrape of both jobs")
        server.names_before_traffic = stored_names(server, OPENMETRICS_JOB)
        succeeded = send_traffic(stub)
        # Every job must have scraped the finished traffic, and every rule been evaluated since.
        counted = f"sum by (job) (beastserve_request_success_total) >= {succeeded}"
        server.wait_until(lambda: len(server.query(counted)) == 2, "scrape after the traffic")
        before = {r["name"]: r["lastEvaluation"] for r in loaded_rules(server)}
        server.wait_until(lambda: all(r["lastEvaluation"] != before[r["name"]] for r in loaded_rules(server)),
                          "evaluation of every rule after the traffic")
        yield server
    finally:
        server.close()


def stored_names(server: Prometheus, job: str) -> set[str]:
    result = server.query(f'group by (__name__) ({{__name__=~"beastserve_.+", job="{job}"}})')
    return {sample["metric"]["__name__"] for sample in result}


def loaded_rules(server: Prometheus) -> list[dict]:
    return [rule for group in server.get("/api/v1/rules")["groups"] for rule in group["rules"]]


def labels_used(expr: str) -> set[str]:
    """The label names a query selects on, groups by or matches on."""
    names = set()

    def visit(node):
        if isinstance(node, promql_parser.MatrixSelector):
            node = node.vector_selector
        if isinstance(node, promql_parser.VectorSelector):
            names.update(m.name for m in node.matchers.matchers)
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            names.update(node.modifier.labels)
        if isinstance(node, promql_parser.BinaryExpr) and node.modifier and node.modifier.matching is not None:
            names.update(node.modifier.matching.labels)

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return names - {"__name__"}


def assert_all_return_data(prometheus: Prometheus, exprs: list[str]) -> None:
    stored_labels = set(prometheus.get("/api/v1/labels"))
    failures = []
    for expr in exprs:
        if missing := labels_used(expr) - stored_labels:
            failures.append(f"{expr}\n    uses labels no stored series has: {sorted(missing)}")
        result = prometheus.query(expr)
        if not result:
            failures.append(f"{expr}\n    returned nothing")
        elif all(math.isnan(float(sample["value"][1])) for sample in result):
            failures.append(f"{expr}\n    returned only NaN: its series exist but the traffic never reached them")
    assert not failures, "\n".join(failures)


COMPARISONS = {"==", "!=", ">", "<", ">=", "<="}


def conditions(node) -> list[str]:
    """An alert expression's parts that hold data whether or not the alert fires: its operands of
    and/or/unless, with comparisons against a constant and absent() removed. An alert's expression is
    empty while all is well, so returning nothing would not tell a wrong name from a healthy service."""
    if isinstance(node, promql_parser.ParenExpr):
        return conditions(node.expr)
    if isinstance(node, promql_parser.BinaryExpr) and str(node.op) in ("and", "or", "unless"):
        return conditions(node.lhs) + conditions(node.rhs)
    if isinstance(node, promql_parser.BinaryExpr) and str(node.op) in COMPARISONS:
        if isinstance(node.rhs, promql_parser.NumberLiteral):
            return conditions(node.lhs)
        if isinstance(node.lhs, promql_parser.NumberLiteral):
            return conditions(node.rhs)
    if isinstance(node, promql_parser.Call) and node.func.name in ("absent", "absent_over_time"):
        return conditions(node.args[0])
    return [str(node)]


# --- The tests -----------------------------------------------------------------------------------------


def test_openmetrics_and_plain_text_scrapes_store_the_same_names(prometheus, text_proxy):
    assert any("application/openmetrics-text" in accept for accept in text_proxy.accepts), text_proxy.accepts
    names = {job: stored_names(prometheus, job) for job in (OPENMETRICS_JOB, TEXT_JOB)}
    assert names[OPENMETRICS_JOB] and names[OPENMETRICS_JOB] == names[TEXT_JOB]


def test_every_queried_series_is_stored_before_the_first_request(prometheus):
    # rate() and increase() miss a counter's first increase when its series appears with it.
    queried = {name for exprs in queried_exprs().values() for expr in exprs for name in selector_names(expr)}
    ours = {name for name in queried if name.startswith("beastserve_")}
    missing = ours - prometheus.names_before_traffic
    assert ours and not missing, f"queried series that appear only with traffic: {sorted(missing)}"


@pytest.mark.parametrize("source", ["grafana/beastserve.json", "k8s/keda/scaledobject.yaml",
                                    "k8s/prometheus-adapter-rules.yaml"])
def test_every_dashboard_and_autoscaler_query_returns_data(prometheus, source):
    exprs = queried_exprs()[source]
    assert exprs
    assert_all_return_data(prometheus, exprs)


def test_every_rule_is_evaluated_without_error(prometheus):
    shipped = [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]
    loaded = loaded_rules(prometheus)
    assert [r["name"] for r in loaded] == [r.get("alert") or r["record"] for r in shipped]
    errors = {r["name"]: r.get("lastError") for r in loaded if r["health"] != "ok"}
    assert not errors, errors
    recorded = [r["record"] for r in shipped if "record" in r]
    assert_all_return_data(prometheus, recorded)


def test_every_alert_condition_returns_data(prometheus):
    alerts = [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"] if "alert" in rule]
    parts = [part for rule in alerts for part in conditions(promql_parser.parse(rule["expr"]))]
    foreign = [p for p in parts if set(selector_names(p)) <= NOT_THE_DAEMONS.keys()]
    assert {name for p in foreign for name in selector_names(p)} == NOT_THE_DAEMONS.keys(), \
        "an exemption no alert needs any more"
    assert_all_return_data(prometheus, [p for p in parts if p not in foreign])


def test_adapter_serves_each_pods_series_under_the_hpa_metric_name(prometheus):
    (hpa_metric,) = load_yaml(K8S / "components/hpa/hpa.yaml")["spec"]["metrics"]
    served = set()
    for rule in ADAPTER_RULES:
        series = prometheus.get("/api/v1/series", **{"match[]": rule["seriesQuery"]})
        assert series, rule["seriesQuery"]
        for name in {s["__name__"] for s in series}:
            # The adapter drops a series whose name its `matches` regex does not match.
            matched = re.search(rule["name"]["matches"], name)
            assert matched, f"{rule['name']['matches']!r} does not match {name!r}: the adapter serves nothing"
            served.add(matched.expand(re.sub(r"\$\{(\d+)\}", r"\\\1", rule["name"]["as"])))
        # What the adapter asks Prometheus for when the HPA reads the metric of the namespace's pods.
        (name,) = selector_names(rule["seriesQuery"])
        query = (rule["metricsQuery"].replace("<<.Series>>", name).replace("<<.GroupBy>>", "pod")
                 .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{"|".join(PODS.values())}"'))
        result = prometheus.query(query)
        assert {sample["metric"]["pod"] for sample in result} == set(PODS.values()), query
    assert hpa_metric["pods"]["metric"]["name"] in served
