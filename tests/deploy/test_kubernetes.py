"""deploy/kubernetes: every overlay renders, validates against the Kubernetes API schemas
(kubernetes-validate, offline), and is wired the way the docs say: GPUs, probes, the headless
Service, monitoring, PDB/HPA targets, admin APIs closed, gRPC TLS. The Triton arguments are
also handed to the real tritonserver 2.51 (empty model repository): it must accept every one,
close the admin APIs it names and speak TLS on gRPC.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kustomize_lite  # noqa: E402  (tests/deploy/kustomize_lite.py)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
OVERLAYS = {"per-gpu": 1, "per-node": 8}           # overlay -> GPUs per pod
TARGETS = {"base": K8S / "base", **{o: K8S / "overlays" / o for o in OVERLAYS}}
ADAPTER = K8S / "prometheus-adapter" / "values.yaml"
SCHEMA_VERSIONS = ("1.28.0", "1.37.0")               # an older cluster and the newest schemas
CRD_KINDS = {"PodMonitor"}                           # not in the core API: checked by hand below
ADMIN_APIS = {"shared-memory", "model-repository", "logging", "trace"}   # issue 14
OPEN_APIS = {"health", "metadata", "inference", "model-config"}          # probes and embed-client


def render(target: str) -> list:
    return kustomize_lite.render(TARGETS[target])


def one(objects, kind):
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{kind}: {len(found)} objects"
    return found[0]


def pod_spec(objects):
    return one(objects, "Deployment")["spec"]["template"]["spec"]


def triton(objects):
    return next(c for c in pod_spec(objects)["containers"] if c["name"] == "triton")


def args_of(container) -> dict:
    """--flag=value arguments as {flag: [values]}."""
    out = {}
    for arg in container.get("args", []):
        flag, _, value = arg.partition("=")
        out.setdefault(flag, []).append(value)
    return out


def selects(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels", selector)
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def normalized(objects) -> list:
    """Objects sorted by kind/name, named lists sorted by name (kustomize puts patched items first)."""
    def norm(node):
        if isinstance(node, dict):
            return {k: norm(v) for k, v in node.items()}
        if isinstance(node, list):
            items = [norm(v) for v in node]
            if items and all(isinstance(i, dict) and "name" in i for i in items):
                items.sort(key=lambda i: str(i["name"]))
            return items
        return node
    return sorted((norm(o) for o in objects), key=lambda o: (o["kind"], o["metadata"]["name"]))


# ------------------------------------------------------------------ rendering and schemas


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_renders_same_as_kubectl_kustomize(target):
    objects = render(target)
    assert {o["kind"] for o in objects} >= {"Deployment", "Service", "PodMonitor", "PodDisruptionBudget",
                                            "HorizontalPodAutoscaler", "NetworkPolicy"}
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: rendered by tests/deploy/kustomize_lite.py only")
    result = subprocess.run([kubectl, "kustomize", str(TARGETS[target])], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    theirs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert normalized(objects) == normalized(theirs)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_manifests_validate_against_kubernetes_schemas(target):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (test extra) is needed")
    objects = render(target)
    checked = set()
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        for version in SCHEMA_VERSIONS:
            try:
                kv.validate(obj, version, strict=True)   # strict: unknown fields are errors
            except kv.ValidationError as e:
                pytest.fail(f"{target}: {obj['kind']}/{obj['metadata']['name']} against {version}: {e}")
        checked.add(obj["kind"])
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= checked


def test_schema_check_catches_a_mistake():
    """The validator really checks: a misspelt field and a wrong type are rejected."""
    kv = pytest.importorskip("kubernetes_validate")
    deployment = one(render("per-gpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, SCHEMA_VERSIONS[-1], strict=True)
    service = one(render("per-gpu"), "Service")
    service["spec"]["ports"][0]["port"] = "eight thousand one"
    with pytest.raises(kv.ValidationError):
        kv.validate(service, SCHEMA_VERSIONS[-1], strict=True)


def test_overlays_set_namespace_and_image():
    for overlay in OVERLAYS:
        objects = render(overlay)
        for obj in objects:
            if obj["kind"] != "Namespace":
                assert obj["metadata"].get("namespace") == "virnuc", (overlay, obj["kind"])
        images = {c["image"] for c in pod_spec(objects)["containers"] + pod_spec(objects)["initContainers"]}
        assert len(images) == 1 and images.pop().endswith("/virnuc-embed-triton:24.10")


# ------------------------------------------------------------------ what matters


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_gpus_per_pod(overlay):
    objects = render(overlay)
    resources = triton(objects)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == OVERLAYS[overlay]
    assert resources["requests"]["nvidia.com/gpu"] == OVERLAYS[overlay]   # extended resources: equal
    for init in pod_spec(objects)["initContainers"]:                       # export runs on CPU
        assert "nvidia.com/gpu" not in str(init.get("resources"))
    spec = pod_spec(objects)
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    dshm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert dshm["emptyDir"]["medium"] == "Memory"
    assert any(m["mountPath"] == "/dev/shm" and m["name"] == "dshm" for m in triton(objects)["volumeMounts"])
    if OVERLAYS[overlay] > 1:   # a whole node per pod: never two on one node
        terms = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert terms[0]["topologyKey"] == "kubernetes.io/hostname"
        assert selects(terms[0]["labelSelector"], one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"])


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_probes_on_triton_health_endpoints(overlay):
    container = triton(render(overlay))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    expected = {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready",
                "livenessProbe": "/v2/health/live"}
    http_port = int(args_of(container).get("--http-port", ["8000"])[0])
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        assert port == http_port == 8000, probe
    startup = container["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 600, "3B loads need >= 10 min"
    assert container["livenessProbe"]["failureThreshold"] * container["livenessProbe"]["periodSeconds"] >= 30


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_headless_service_selects_the_pods(overlay):
    objects = render(overlay)
    service = one(objects, "Service")
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["clusterIP"] == "None"
    assert selects(service["spec"]["selector"], pod_labels)
    assert selects(one(objects, "Deployment")["spec"]["selector"], pod_labels)
    container_ports = {p["name"]: p["containerPort"] for p in triton(objects)["ports"]}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert service_ports["grpc"]["port"] == 8001 and container_ports[service_ports["grpc"]["targetPort"]] == 8001
    assert container_ports[service_ports["metrics"]["targetPort"]] == 8002
    assert 8000 not in {p["port"] for p in service["spec"]["ports"]}, "HTTP is for probes only"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_monitoring_pdb_hpa_target_the_workload(overlay):
    objects = render(overlay)
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = triton(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    monitor = one(objects, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert selects(monitor["spec"]["selector"], pod_labels)
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert ports[endpoint["port"]] == int(args_of(container)["--metrics-port"][0]) == 8002
    assert endpoint.get("path", "/metrics") == "/metrics"

    pdb = one(objects, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"], pod_labels)
    assert pdb["spec"].get("maxUnavailable") == 1

    hpa = one(objects, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"], ref["apiVersion"]) == ("Deployment", deployment["metadata"]["name"], "apps/v1")
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    rules = yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]
    served = {r["name"]["as"]: r for r in rules}
    rule = served[metric["pods"]["metric"]["name"]]
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "nv_inference_queue_duration_us" in rule["metricsQuery"]
    assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
    assert rule["metricsQuery"].count("(") == rule["metricsQuery"].count(")")


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_admin_apis_closed_and_grpc_tls(overlay):
    objects = render(overlay)
    container = triton(objects)
    args = args_of(container)
    env = {e["name"]: e for e in container["env"]}
    for flag in ("--http-restricted-api", "--grpc-restricted-protocol"):
        assert len(args.get(flag, [])) == 1, f"{flag} missing"
        apis, _, header = args[flag][0].partition(":")
        apis = set(apis.split(","))
        assert ADMIN_APIS <= apis, f"{flag}: {ADMIN_APIS - apis} left open"
        assert not apis & OPEN_APIS, f"{flag} closes {apis & OPEN_APIS}: probes or embed-client would fail"
        key, _, value = header.partition("=")
        assert key and value == "$(TRITON_ADMIN_KEY)", "the key comes from the environment, not the manifest"
    ref = env["TRITON_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"] and "value" not in env["TRITON_ADMIN_KEY"]
    assert args["--grpc-use-ssl"] == ["true"]
    tls_volume = next(v for v in pod_spec(objects)["volumes"] if v["name"] == "tls")
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
    assert tls_volume["secret"]["secretName"] and mount["readOnly"] is True
    for flag, name in (("--grpc-server-cert", "tls.crt"), ("--grpc-server-key", "tls.key")):
        assert args[flag] == [f"{mount['mountPath']}/{name}"]
    assert args.get("--model-control-mode", ["none"]) == ["none"]
    # Only gRPC and metrics are admitted from other pods (HTTP: probes only, issue 14's crash).
    policy = one(objects, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"], one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"])
    admitted = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert admitted == {"grpc", "metrics"}
    # Nothing privileged.
    spec = pod_spec(objects)
    assert spec["securityContext"]["runAsNonRoot"] is True
    for c in spec["containers"] + spec["initContainers"]:
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert not c["securityContext"].get("privileged")


# ------------------------------------------------------------------ the real tritonserver


def _free_ports(n):
    from embed_server.launcher import free_ports
    return free_ports(n)


def _http(url, data=None, headers=None):
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:   # not listening yet
        return 0


@pytest.mark.server
def test_tritonserver_accepts_the_manifest_arguments(tmp_path):
    """The Deployment's own arguments on the real tritonserver 2.51: admin APIs answer only with
    the key, health and metadata stay open, gRPC speaks TLS with the Secret's certificate."""
    launcher = pytest.importorskip("embed_server.launcher")
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    try:
        binary = launcher.find_tritonserver()
    except launcher.LaunchError as e:
        pytest.skip(str(e))
    cert, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key_file), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    (tmp_path / "repository").mkdir()
    admin_key = "test-admin-key-0123"
    http, grpc, metrics = _free_ports(3)
    container = triton(render("per-gpu"))
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")["mountPath"]
    args = []
    for arg in container["args"]:
        flag = arg.split("=", 1)[0]
        if flag in ("--metrics-port", "--allow-gpu-metrics"):
            continue   # ports: ours below; GPU metrics: no GPU here
        arg = arg.replace("$(TRITON_ADMIN_KEY)", admin_key)
        arg = arg.replace(f"{mount}/tls.crt", str(cert)).replace(f"{mount}/tls.key", str(key_file))
        arg = arg.replace("/models/repository", str(tmp_path / "repository"))
        args.append(arg)
    assert not [a for a in args if "$(" in a], "every $(VAR) in the args has an env entry"
    command = [str(binary), *args, f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}",
               "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"]
    log = open(tmp_path / "tritonserver.log", "wb")
    process = subprocess.Popen(command, env=launcher.server_env(binary), stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 60
        while _http(base + "/v2/health/ready") != 200:
            assert process.poll() is None, (tmp_path / "tritonserver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "tritonserver not ready in 60 s"
            time.sleep(0.2)
        assert _http(base + "/v2/health/live") == 200 and _http(base + "/v2") == 200
        admin = {"/v2/logging": None, "/v2/repository/index": b"{}", "/v2/systemsharedmemory/status": None,
                 "/v2/cudasharedmemory/status": None, "/v2/trace/setting": None}
        for path, body in admin.items():
            assert _http(base + path, body) == 403, f"{path} open without the key"
        assert _http(base + "/v2/logging", headers={"admin-key": "wrong"}) == 403
        assert _http(base + "/v2/logging", headers={"admin-key": admin_key}) == 200
        assert _http(base + "/v2/repository/index", b"{}", {"admin-key": admin_key}) == 200

        client = grpcclient.InferenceServerClient(f"localhost:{grpc}", ssl=True, root_certificates=str(cert))
        try:
            assert client.is_server_live() and client.get_server_metadata().version == "2.51.0"
            for call in (client.get_log_settings, client.get_system_shared_memory_status,
                         client.get_cuda_shared_memory_status, client.get_model_repository_index,
                         client.get_trace_settings):
                with pytest.raises(InferenceServerException, match="restricted"):
                    call()
            header = {"triton-grpc-protocol-admin-key": admin_key}
            assert client.get_log_settings(headers=header) is not None
        finally:
            client.close()
        plain = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        try:   # no TLS, no answer
            with pytest.raises(InferenceServerException):
                plain.is_server_live(client_timeout=5)
        finally:
            plain.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
