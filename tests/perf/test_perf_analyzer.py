"""perf/: NVIDIA's perf_analyzer (Triton 2.51's, installed by perf/install_perf_analyzer.sh) against the
session's CPU tritonserver on our perf_analyzer input files, for each model: every request it sends
succeeds, each answer holds one embedding per batch element, and the server counted exactly the
requests perf_analyzer reports (Triton's /v2/models/<m>/stats success and inference counts,
nv_inference_request_success, our embed_sequences_total).

`--request-count N` makes perf_analyzer send exactly N requests and report on all of them; its
window modes (time_windows, count_windows) also send requests between and after the windows they
report, so their counts cannot be matched with the server's. Skipped, saying which library or
binary is missing, where perf_analyzer cannot run (perf/perf_analyzer.py --check says the same)."""
from __future__ import annotations

import csv
import functools
import importlib.util
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REQUESTS = 20
METRICS = ("nv_inference_request_success", "nv_inference_request_failure", "embed_sequences_total")

# (model, protocol, batch size, concurrency, input file): each model over gRPC, and HTTP through
# embed-server's front end once.
CASES = [
    ("esm2", "grpc", 1, 2, "esm2_mixed.json"),
    ("dnabert_s", "grpc", 4, 2, "dnabert_s_len_380_500.json"),
    ("esm2", "http", 2, 1, "esm2_len_130_170.json"),
]


@functools.cache
def load_perf_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "perf" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# Located at collection: where it cannot run, the tests skip before the session server starts.
PERF_ANALYZER = load_perf_module("perf_analyzer").locate()
pytestmark = pytest.mark.skipif(not PERF_ANALYZER.ok,
                                reason=f"perf_analyzer cannot run here: {PERF_ANALYZER.reason()}")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("perf_inputs")
    load_perf_module("make_perf_inputs").write_inputs(out, count=32, seed=1)
    return out


def server_counts(server, model: str) -> dict:
    """The server's own counters of `model`: Triton's statistics extension and /metrics."""
    with urllib.request.urlopen(f"{server.http_url}/v2/models/{model}/stats", timeout=10) as response:
        [stats] = json.loads(response.read())["model_stats"]
    found = load_perf_module("sweep_perf_analyzer").counters(server.metrics_url)
    metrics = {name: int(found[(name, model)]) for name in METRICS if (name, model) in found}
    return {
        "success": int(stats["inference_stats"]["success"]["count"]),
        "fail": int(stats["inference_stats"]["fail"]["count"]),
        "inferences": int(stats["inference_count"]),
        **metrics,
    }


def delta(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


def wait_for_counts(embed_server, model: str, before: dict) -> dict:
    """The server's counts since `before`, once REQUESTS successes have landed (at most 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        counted = delta(server_counts(embed_server, model), before)
        if counted["success"] >= REQUESTS or time.monotonic() > deadline:
            return counted
        time.sleep(0.2)


@pytest.mark.server
@pytest.mark.parametrize("model,protocol,batch,concurrency,input_file", CASES,
                         ids=[f"{m}-{p}-b{b}-c{c}" for m, p, b, c, _ in CASES])
def test_perf_analyzer_counts_match_the_server(inputs, embed_server, tmp_path,
                                               model, protocol, batch, concurrency, input_file):
    url = embed_server.grpc_url if protocol == "grpc" else embed_server.http_url.split("://", 1)[1]
    csv_path, export_path = tmp_path / "pa.csv", tmp_path / "profile.json"
    for attempt in (1, 2):
        before = server_counts(embed_server, model)
        run = subprocess.run(
            PERF_ANALYZER.command([
                "-m", model, "-i", protocol, "-u", url, "--input-data", inputs / input_file,
                "-b", batch, "--concurrency-range", concurrency, "--request-count", REQUESTS,
                "-f", csv_path, "--profile-export-file", export_path,
            ]),
            env=PERF_ANALYZER.env, capture_output=True, text=True, timeout=120)
        output = run.stdout + run.stderr
        assert run.returncode == 0, f"perf_analyzer exited {run.returncode}:\n{output[-4000:]}"
        export = export_path.read_text() if export_path.exists() else ""
        if export.strip() or attempt == 2:
            break
        # perf_analyzer 2.51 once left its profile export empty though it exited 0 (one run of
        # some hundred, a fresh-clone CI run): run it once more, counting from after this run's
        # requests have landed in the server's statistics.
        wait_for_counts(embed_server, model, before)

    # perf_analyzer's own account: N requests, N answers, each with one embedding per batch element.
    client = re.search(r"Client:\s*\n\s*Request count: (\d+)", output)
    assert client and int(client.group(1)) == REQUESTS, output[-3000:]
    [experiment] = json.loads(export)["experiments"]
    assert experiment["experiment"] == {"mode": "concurrency", "value": concurrency}
    requests = experiment["requests"]
    assert len(requests) == REQUESTS
    for request in requests:
        assert len(request["response_timestamps"]) == 1
        [answer] = request["response_outputs"]
        assert len(answer["EMBEDDING"]) == batch * embed_server.hidden_sizes[model]

    # The server's account (its statistics land a moment after the last answer at most).
    counted = wait_for_counts(embed_server, model, before)
    assert counted == {
        "success": REQUESTS, "fail": 0, "inferences": REQUESTS * batch,
        "nv_inference_request_success": REQUESTS, "nv_inference_request_failure": 0,
        "embed_sequences_total": REQUESTS * batch,
    }, output[-3000:]
    server = re.search(r"Server:\s*\n\s*Inference count: (\d+)\s*\n\s*Execution count: \d+\s*\n"
                       r"\s*Successful request count: (\d+)", output)
    assert server and (int(server.group(1)), int(server.group(2))) == (REQUESTS * batch, REQUESTS), output[-3000:]

    # The CSV the GPU sweep reads (perf/sweep_perf_analyzer.py): one row for the concurrency.
    [row] = list(csv.DictReader(csv_path.open()))
    assert int(row["Concurrency"]) == concurrency and float(row["Inferences/Second"]) > 0
    for column in ("Server Queue", "Server Compute Infer", "p50 latency", "p90 latency", "p99 latency"):
        assert float(row[column]) >= 0, column


@pytest.mark.server
def test_sweep_against_the_session_server(embed_server, tmp_path):
    """perf/sweep_perf_analyzer.py (the GPU sweep) end to end on the CPU server, tiny: every bucket of
    both models once, each row checked against the server's counters."""
    metrics = embed_server.metrics_url
    run = subprocess.run(
        [sys.executable, str(ROOT / "perf" / "sweep_perf_analyzer.py"), "--out", str(tmp_path / "out"),
         "--workdir", str(tmp_path / "work"), "--grpc-url", embed_server.grpc_url, "--metrics-url", metrics,
         "--no-mixed", "--count", "16", "-b", "2", "--concurrency", "2", "--rounds", "3"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "perf_analyzer_sweep.json").read_text())
    buckets = {m: len(b) for m, b in load_perf_module("make_perf_inputs").BUCKETS.items()}
    assert [r["model"] for r in result["rows"]] == ["esm2"] * buckets["esm2"] + ["dnabert_s"] * buckets["dnabert_s"]
    for row in result["rows"]:
        assert row["ok"] and row["requests"] == 6 and row["server_success"] == 6, row
        assert row["sequences_per_s"] > 0 and row["tokens_per_s"] > row["sequences_per_s"]
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    table = (tmp_path / "out" / "perf_analyzer_sweep.md").read_text()
    assert table.count("| OK |") == len(result["rows"]) and table in run.stdout
    with (tmp_path / "out" / "perf_analyzer_sweep.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == len(result["rows"])
