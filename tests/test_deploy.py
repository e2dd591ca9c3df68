"""The compose deployment: files parse, wiring is consistent, and every metric the dashboard
and the Prometheus rules use is one a real server exports.

The metric check scrapes the session tritonserver (tests/conftest.py) after it has served
a good and a bad request per model, so every counter family exists.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is needed to read the compose and Prometheus files")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "embeddings.json"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "embeddings.yml"

# Metrics only a GPU host exports: Triton's DCGM metrics (label gpu_uuid). A CPU server has
# no GPU to report; both were seen on the H200 machines under tritonserver 2.51 (docs/triton.md).
GPU_ONLY_METRICS = {"nv_gpu_utilization", "nv_gpu_memory_used_bytes"}
# Series Prometheus itself adds to every scrape target.
PROMETHEUS_SERIES = {"up"}

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
    "offset", "inf", "nan",
}


def promql_metrics(expr: str) -> set:
    """The metric (or recorded series) names a PromQL expression reads."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', "", expr)                   # string literals
    text = re.sub(r"\{[^}]*\}", "", text)                             # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                            # range / subquery windows
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    text = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][+-]?\d+)?", " ", text)  # numbers (1e6 too)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end():].lstrip().startswith("(") or match.group().lower() in PROMQL_WORDS:
            continue  # a function call or a keyword
        names.add(match.group())
    return names


def dashboard_exprs() -> list:
    exprs = []

    def walk(panels):
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return exprs


def rule_entries() -> list:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


# ------------------------------------------------------------------ static checks


def test_promql_metrics_parser():
    assert promql_metrics('sum by (model, gpu) (rate(embed_tokens_total{model="esm2"}[$__rate_interval]))') == {
        "embed_tokens_total"}
    assert promql_metrics("a:b:c > 5 and on() (max(nv_gpu_utilization) < 1e-3)") == {"a:b:c", "nv_gpu_utilization"}


def test_compose_triton_service():
    compose = yaml.safe_load(COMPOSE.read_text())
    triton = compose["services"]["triton"]
    assert (ROOT / triton["build"]["context"] / triton["build"]["dockerfile"]).resolve() == DOCKERFILE
    command = " ".join(triton["command"])
    for flag in ("--model-repository=/models", "--allow-metrics=true", "--allow-gpu-metrics=true",
                 "--metrics-port=8002", "--backend-config=python,shm-default-byte-size="):
        assert flag in command
    assert any(v.endswith(":/models:ro") for v in triton["volumes"])
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert triton["shm_size"] and triton["ulimits"]["memlock"] == -1
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    # Every published port binds to ${BIND_ADDRESS:-127.0.0.1}: this host only unless overridden.
    for service in compose["services"].values():
        for port in service.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), port
    assert sorted(p.rsplit(":", 2)[-1] for p in triton["ports"]) == ["8000", "8001", "8002"]


def test_compose_mounts_exist():
    compose = yaml.safe_load(COMPOSE.read_text())
    for name in ("prometheus", "grafana"):
        for volume in compose["services"][name]["volumes"]:
            host = volume.split(":")[0]
            if host.startswith("./"):
                assert (ROOT / host).exists(), f"{name} mounts {host}, which is not in the repository"


def test_dockerfile_base_and_numpy_pin():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG TRITON_VERSION=24\.10$", text, re.M), "24.10 = Triton 2.51, what the tests run"
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3" in text
    assert '"numpy>=1.24,<2"' in text and '".[core]"' in text
    for line in re.findall(r"^COPY (\S+)", text, re.M):
        assert (ROOT / line).exists(), f"COPY {line}: not in the repository"


def test_prometheus_config():
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules.yml"]  # ./deploy/prometheus is mounted there
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "triton:8002" in targets


def test_rules_are_well_formed():
    rules = rule_entries()
    assert {r["record"] for r in rules if "record" in r} and {r["alert"] for r in rules if "alert" in r}
    for rule in rules:
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["expr"]
        if "record" in rule:
            assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", rule["record"]), rule["record"]


def test_grafana_provisioning_matches_dashboard():
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"][0]
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels and all(p["datasource"]["uid"] == datasource["uid"] for p in panels)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = " ".join(dashboard_exprs())
    for metric in ("embed_tokens_total", "embed_sequences_total", "nv_gpu_utilization", "nv_gpu_memory_used_bytes",
                   "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
                   "nv_inference_count", "nv_inference_exec_count", "embed_failures_total",
                   "nv_inference_request_failure", "embed_prep_seconds_total", "embed_compute_seconds_total"):
        assert metric in exprs, f"the dashboard has no panel on {metric}"
    assert "by (model, gpu)" in exprs  # per-GPU throughput


def test_docker_compose_config():
    """`docker compose config` validates the file against the compose spec, where available."""
    docker = shutil.which("docker")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True) if docker else None
    if probe is None or probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed here: compose spec validation skipped "
                    "(the YAML structure is checked by the other tests)")
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_promtool_check():
    """promtool validates the Prometheus config and rules, where installed (Debian: prometheus)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed here: Prometheus config/rules validation skipped")
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ against the real server


def scrape(url: str) -> set:
    """Every metric name on a Prometheus text endpoint (families and samples)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


@pytest.mark.server
def test_dashboard_and_rules_use_exported_metrics(embed_server):
    grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is needed")
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(embed_server.grpc_url)
    try:
        for model, good in (("esm2", "MKTAYIAKQR"), ("dnabert_s", "ACGTACGTTGCA")):
            for sequence, ok in ((good, True), ("12?!", False)):  # a failure creates the failure series
                tensor = grpcclient.InferInput("SEQUENCE", [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[sequence.encode()]], dtype=object))
                if ok:
                    client.infer(model, [tensor])
                else:
                    with pytest.raises(InferenceServerException):
                        client.infer(model, [tensor])
    finally:
        client.close()
    exported = scrape(embed_server.metrics_url)
    rules = rule_entries()
    recorded = {r["record"] for r in rules if "record" in r}
    used = {}
    for expr in dashboard_exprs() + [r["expr"] for r in rules]:
        for name in promql_metrics(expr):
            used.setdefault(name, expr)
    unknown = {name: expr for name, expr in used.items()
               if name not in exported | recorded | GPU_ONLY_METRICS | PROMETHEUS_SERIES}
    assert not unknown, f"metrics used but not exported by tritonserver: {unknown}"
    # The allow-list stays minimal: each GPU-only name is really used.
    assert GPU_ONLY_METRICS <= set(used)
