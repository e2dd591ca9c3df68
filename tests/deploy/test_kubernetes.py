"""deploy/kubernetes: every overlay renders, validates against the Kubernetes API schemas
(kubernetes-validate, offline), and is wired the way the docs say: GPUs, probes, the headless
Service, monitoring, PDB/HPA targets, admin APIs closed, TLS. The container's arguments go
through embed-server's own parser and launcher: the tritonserver command they produce must
restrict the admin APIs on HTTP and gRPC with the key from the mounted Secret and serve gRPC
over TLS (tests/server/test_safety.py runs such a server and tries those APIs).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kustomize_lite  # noqa: E402  (tests/deploy/kustomize_lite.py)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
OVERLAYS = {"per-gpu": 1, "per-node": 8, "plaintext-grpc": 1}   # overlay -> GPUs per pod
PLAINTEXT = {"plaintext-grpc"}                       # overlays without TLS (trusted networks)
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
    args = args_of(container)
    http_port = int(args.get("--http-port", ["8000"])[0])
    scheme = "HTTPS" if "--tls-cert" in args else "HTTP"     # the front end serves HTTPS with TLS
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        assert port == http_port == 8000, probe
        assert get.get("scheme", "HTTP") == scheme, probe
    startup = container["startupProbe"]
    budget = startup["failureThreshold"] * startup["periodSeconds"]
    assert budget >= 600, "3B loads need >= 10 min"
    # embed-server gives up (naming the model) no later than the kubelet would kill it
    assert float(args["--startup-timeout"][0]) <= budget
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


def secret_mount(objects, container, volume_name):
    """(mountPath, secretName) of the Secret volume `volume_name` in `container`."""
    volume = next(v for v in pod_spec(objects)["volumes"] if v["name"] == volume_name)
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume_name)
    assert mount.get("readOnly") is True and volume["secret"]["secretName"]
    return mount["mountPath"], volume["secret"]["secretName"]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_admin_key_and_tls_from_secrets(overlay):
    objects = render(overlay)
    container = triton(objects)
    assert container["command"] == ["embed-server"]     # the front ends, restrictions, TLS
    args = args_of(container)
    key_dir, _ = secret_mount(objects, container, "admin-key")
    assert args["--admin-key-file"] == [f"{key_dir}/admin-key"]
    if overlay in PLAINTEXT:
        assert "--tls-cert" not in args and "--tls-key" not in args
        assert "tls" not in {v["name"] for v in pod_spec(objects)["volumes"]}
    else:
        tls_dir, _ = secret_mount(objects, container, "tls")
        assert args["--tls-cert"] == [f"{tls_dir}/tls.crt"] and args["--tls-key"] == [f"{tls_dir}/tls.key"]
    assert args["--address"] == ["0.0.0.0"]
    # No key in the manifest: not in the arguments, not in the environment.
    assert not [e for e in container.get("env", []) if "KEY" in e["name"].upper()]
    assert not [a for a in container["args"] if "$(" in a]
    triton_args = args.get("--triton-arg", [])
    assert not [a for a in triton_args if "restricted" in a or "ssl" in a or "address" in a]
    assert "--triton-arg=--model-control-mode=explicit" not in container["args"]
    # Only gRPC and metrics are admitted from other pods.
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


def test_plaintext_overlay_differs_only_by_tls():
    """Its argument list replaces the base's whole: the same arguments, less the two TLS ones."""
    base = triton(render("per-gpu"))
    plain = triton(render("plaintext-grpc"))
    assert plain["args"] == [a for a in base["args"] if not a.startswith(("--tls-cert=", "--tls-key="))]
    assert {k: v for k, v in plain.items() if k not in ("args", "volumeMounts") and not k.endswith("Probe")} == \
        {k: v for k, v in base.items() if k not in ("args", "volumeMounts") and not k.endswith("Probe")}


def test_embed_server_turns_the_arguments_into_a_closed_tls_tritonserver(tmp_path):
    """The container's arguments through embed-server's own parser and launcher: the
    tritonserver command restricts shared-memory, model-repository, logging and trace on
    both protocols with the mounted admin key, and serves gRPC over TLS from the mounted files."""
    cli = pytest.importorskip("embed_server.cli")
    launcher = pytest.importorskip("embed_server.launcher")
    objects = render("per-gpu")
    container = triton(objects)
    key_dir, _ = secret_mount(objects, container, "admin-key")
    tls_dir, _ = secret_mount(objects, container, "tls")
    admin_key = "k8s-test-admin-key-0123456789"
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "admin-key").write_text(admin_key + "\n")
    (tmp_path / "tls").mkdir()
    for name in ("tls.crt", "tls.key"):
        (tmp_path / "tls" / name).write_text("PEM\n")
    (tmp_path / "repository").mkdir()
    args = [a.replace(key_dir, str(tmp_path / "keys")).replace(tls_dir, str(tmp_path / "tls"))
             .replace("/models/repository", str(tmp_path / "repository")) for a in container["args"]]
    parsed = cli.build_parser().parse_args(args)         # every argument is one embed-server takes
    options = launcher.ServerOptions(
        model_repository=parsed.model_repository, address=parsed.address, http_port=parsed.http_port,
        grpc_port=parsed.grpc_port, metrics_port=parsed.metrics_port,
        max_request_bytes=parsed.max_request_bytes, tls_cert=parsed.tls_cert, tls_key=parsed.tls_key,
        admin_key=cli.read_key(parsed.admin_key_file, "EMBED_ADMIN_KEY", "admin key"),
        triton_args=tuple(parsed.triton_arg))
    command = launcher.TritonServer(options).command(Path("tritonserver"), tmp_path / "backends")
    flags = {}
    for arg in command[1:]:
        flag, _, value = arg.partition("=")
        flags.setdefault(flag, []).append(value)
    for flag, closed in (("--grpc-restricted-protocol", ADMIN_APIS),
                         # HTTP: tritonserver listens on a private socket; the front end gates
                         # model-repository itself (tests/server/test_safety.py)
                         ("--http-restricted-api", ADMIN_APIS - {"model-repository"})):
        (value,) = flags[flag]
        apis, _, header = value.partition(":")
        assert closed <= set(apis.split(",")) and not set(apis.split(",")) & OPEN_APIS, flag
        assert header == f"admin-key={admin_key}", flag
    assert set(launcher.frontend.ADMIN_APIS) >= ADMIN_APIS
    assert flags["--grpc-use-ssl"] == ["true"]
    assert flags["--grpc-server-cert"] == [str((tmp_path / "tls" / "tls.crt").resolve())]
    assert flags["--grpc-server-key"] == [str((tmp_path / "tls" / "tls.key").resolve())]
    assert flags["--grpc-address"] == ["0.0.0.0"] and flags["--http-address"][0].startswith("unix:")
    assert flags["--metrics-address"][0].startswith("unix:")   # behind the metrics front end
    assert flags["--exit-timeout-secs"] == ["60"] and flags["--allow-gpu-metrics"] == ["true"]
