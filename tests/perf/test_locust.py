"""perf/: the locust user headless against the session tritonserver (no failures, and the server
counted exactly the sequences locust reports as sent: embed_sequences_total deltas), and the
perf_analyzer input files (format, lengths, accepted by the real models)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "perf" / "locustfile.py"
SEQS_PER_REQUEST = 4


def load_make_perf_inputs():
    spec = importlib.util.spec_from_file_location("make_perf_inputs", ROOT / "perf" / "make_perf_inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def served_sequences(metrics_url: str) -> Counter:
    """embed_sequences_total summed over instances, per model."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    counts = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "embed_sequences_total":
                counts[sample.labels["model"]] += int(sample.value)
    return counts


@pytest.mark.server
def test_locust_headless_counts_match_the_server(embed_server, tmp_path):
    # find_spec, not import: importing locust monkey-patches the whole test process with
    # gevent, which deadlocks against the session server's threads.
    if importlib.util.find_spec("locust") is None:
        pytest.skip("the load test needs locust (extra 'perf')")
    pytest.importorskip("tritonclient.grpc", reason="the load test needs tritonclient[grpc] (extra 'client')")
    before = served_sequences(embed_server.metrics_url)
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", "4", "-r", "4", "--run-time", "20s",
        "--stop-timeout", "30",            # in-flight requests finish and are reported
        "--host", embed_server.grpc_url,
        "--seqs-per-request", str(SEQS_PER_REQUEST), "--request-rate", "2",
        "--json", "--only-summary", "--loglevel", "WARNING",
    ]
    # cwd: an empty folder, so no stray locust.conf is read
    run = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert run.returncode == 0, f"locust exited {run.returncode}:\n{run.stderr[-4000:]}"
    stats = json.loads(run.stdout)
    after = served_sequences(embed_server.metrics_url)

    requests = {s["name"]: s["num_requests"] for s in stats}
    failures = {s["name"]: s["num_failures"] for s in stats}
    assert set(requests) == {"esm2", "dnabert_s"}, requests
    assert sum(failures.values()) == 0, run.stderr[-4000:]
    assert all(n > 0 for n in requests.values()), requests
    for model, n in requests.items():
        assert after[model] - before[model] == n * SEQS_PER_REQUEST, (model, n, before, after)


def test_perf_inputs_format_and_lengths(tmp_path):
    mpi = load_make_perf_inputs()
    assert mpi.main(["--out", str(tmp_path), "--count", "64", "--seed", "3"]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    expected = [f"{m}_len_{lo:03d}_{hi:03d}.json" for m, b in mpi.BUCKETS.items() for lo, hi in b]
    assert written == sorted(expected + ["esm2_mixed.json", "dnabert_s_mixed.json"])
    for model, buckets in mpi.BUCKETS.items():
        alphabet = set("ACDEFGHIKLMNPQRSTVWY") if model == "esm2" else set("ACGTN")
        files = [(f"{model}_len_{lo:03d}_{hi:03d}.json", lo, hi) for lo, hi in buckets]
        files.append((f"{model}_mixed.json", buckets[0][0], buckets[-1][1]))
        for name, lo, hi in files:
            entries = json.loads((tmp_path / name).read_text())["data"]
            assert len(entries) == 64
            for entry in entries:
                assert list(entry) == ["SEQUENCE"] and entry["SEQUENCE"]["shape"] == [1]
                [sequence] = entry["SEQUENCE"]["content"]
                assert lo <= len(sequence) <= hi and set(sequence) <= alphabet
    again = tmp_path / "again"
    mpi.main(["--out", str(again), "--count", "64", "--seed", "3"])
    assert (again / "esm2_mixed.json").read_text() == (tmp_path / "esm2_mixed.json").read_text()


@pytest.mark.server
def test_perf_inputs_are_accepted_by_the_models(embed_server, tmp_path):
    """A -b 16 request built as perf_analyzer builds it (16 consecutive entries) from every file."""
    grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is needed")
    mpi = load_make_perf_inputs()
    mpi.write_inputs(tmp_path, count=16)
    client = grpcclient.InferenceServerClient(embed_server.grpc_url)
    try:
        for path in sorted(tmp_path.glob("*.json")):
            model = "esm2" if path.name.startswith("esm2") else "dnabert_s"
            rows = [e["SEQUENCE"]["content"] for e in json.loads(path.read_text())["data"]]
            tensor = grpcclient.InferInput("SEQUENCE", [len(rows), 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[r[0].encode()] for r in rows], dtype=object))
            embedding = client.infer(model, [tensor]).as_numpy("EMBEDDING")
            assert embedding.shape == (16, embed_server.hidden_sizes[model]) and np.isfinite(embedding).all()
    finally:
        client.close()
