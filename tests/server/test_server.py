"""End to end through a real tritonserver: gRPC, HTTP/JSON, metrics, errors, launcher.

The session server (tests/conftest.py) runs both models on CPU instances (two per model)
with the demo checkpoints; every answer is compared with the model core run directly.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytestmark = pytest.mark.server

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is needed (extra 'client')")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is needed (extra 'client')")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODELS = ("esm2", "dnabert_s")
TOLERANCE = 1e-5


# ------------------------------------------------------------------ three ways to ask


def infer_grpc(server, model, sequences, name="SEQUENCE", datatype="BYTES", shape=None, data=None):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        tensor = grpcclient.InferInput(name, shape or [len(sequences), 1], datatype)
        if data is None:
            data = np.array([[s.encode() if isinstance(s, str) else s] for s in sequences], dtype=object)
        tensor.set_data_from_numpy(data)
        return client.infer(model, [tensor]).as_numpy("EMBEDDING")
    finally:
        client.close()


def infer_http(server, model, sequences):
    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    try:
        tensor = httpclient.InferInput("SEQUENCE", [len(sequences), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[s] for s in sequences], dtype=object), binary_data=False)
        wanted = httpclient.InferRequestedOutput("EMBEDDING", binary_data=False)
        return client.infer(model, [tensor], outputs=[wanted]).as_numpy("EMBEDDING")
    finally:
        client.close()


def post_json(url, body):
    """(HTTP status, parsed JSON) of a POST, errors included."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def infer_raw_json(server, model, sequences):
    """A plain KServe v2 JSON request, as curl would send it."""
    body = {"inputs": [{"name": "SEQUENCE", "shape": [len(sequences), 1], "datatype": "BYTES", "data": sequences}]}
    status, answer = post_json(f"{server.http_url}/v2/models/{model}/infer", body)
    assert status == 200, answer
    (output,) = answer["outputs"]
    assert output["name"] == "EMBEDDING" and output["datatype"] == "FP32"
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


TRANSPORTS = {"grpc": infer_grpc, "http": infer_http, "json": infer_raw_json}


def model_stats(server, model):
    """(requests, executions) the server counted for `model` so far."""
    with urllib.request.urlopen(f"{server.http_url}/v2/models/{model}/stats", timeout=30) as response:
        (stats,) = json.loads(response.read())["model_stats"]
    return int(stats["inference_stats"]["success"]["count"]), int(stats["execution_count"])


def model_stats_once_counted(server, model, requests, timeout_s=10.0):
    """model_stats once Triton counts at least `requests` successful requests (or after timeout_s).

    Triton can count a request in its statistics after the client already has the answer (seen:
    2 of 30 requests not yet counted when read right after the last answer), so a test reading the
    statistics right after its requests waits for them; a count that never arrives still fails.
    """
    deadline = time.monotonic() + timeout_s
    stats = model_stats(server, model)
    while stats[0] < requests and time.monotonic() < deadline:
        time.sleep(0.05)
        stats = model_stats(server, model)
    return stats


def read_metrics(server):
    """{(metric, model, gpu, instance): value} for our embed_* counters."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.metrics_url, timeout=30) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("embed_"):
                labels = sample.labels
                out[(sample.name, labels["model"], labels["gpu"], labels["instance"])] = sample.value
    return out


def split(sequences, sizes):
    """Consecutive requests of the given sizes (cycled) covering all sequences."""
    out, i, k = [], 0, 0
    while i < len(sequences):
        out.append(sequences[i:i + sizes[k % len(sizes)]])
        i += sizes[k % len(sizes)]
        k += 1
    return out


def send_concurrently(fn, requests, threads=8):
    """fn(request) for every request from `threads` threads; results (or exceptions) in order."""
    def call(request):
        try:
            return fn(request)
        except Exception as err:  # returned, so one failure does not hide the others
            return err

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(call, requests))


# ------------------------------------------------------------------ answers


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
@pytest.mark.parametrize("model", MODELS)
def test_concurrent_requests_equal_the_model_core(embed_server, reference, make_sequences, model, transport):
    sequences = make_sequences(model, 40, seed=10 * MODELS.index(model) + sorted(TRANSPORTS).index(transport))
    expected = reference(model).embed(sequences)
    requests = split(sequences, [1, 5, 2, 8, 3])
    infer = TRANSPORTS[transport]
    answers = send_concurrently(lambda seqs: infer(embed_server, model, seqs), requests)
    start = 0
    for seqs, got in zip(requests, answers):
        assert not isinstance(got, Exception), got
        assert got.shape == (len(seqs), embed_server.hidden_sizes[model])
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected[start:start + len(seqs)], atol=TOLERANCE, rtol=0)
        start += len(seqs)


def test_model_metadata_and_config(embed_server):
    client = grpcclient.InferenceServerClient(embed_server.grpc_url)
    try:
        for model in MODELS:
            assert client.is_model_ready(model)
            config = client.get_model_config(model, as_json=True)["config"]
            assert [g["kind"] for g in config["instance_group"]] == ["KIND_CPU"]
            assert int(config["instance_group"][0]["count"]) == 2
            dims = {output["name"]: [int(d) for d in output["dims"]] for output in config["output"]}
            hidden = embed_server.hidden_sizes[model]
            assert dims == {"EMBEDDING": [hidden], "BOS": [hidden], "TOKEN_EMBEDDINGS": [-1, -1], "TOKEN_COUNT": [1]}
    finally:
        client.close()


# ------------------------------------------------------------------ batching and metrics


def test_both_cpu_instances_work_and_counters_add_up(embed_server, reference, make_sequences):
    """Under concurrent load both instances of each model take batches; the per-instance
    counters sum to exactly what was sent, and the dynamic batcher merged requests."""
    before = read_metrics(embed_server)
    stats_before = {m: model_stats(embed_server, m) for m in MODELS}
    sent = {}
    for model in MODELS:
        sequences = make_sequences(model, 144, seed=7, hi=60)
        sent[model] = sequences
        requests = split(sequences, [3])
        answers = send_concurrently(lambda seqs: infer_grpc(embed_server, model, seqs), requests, threads=16)
        assert not [a for a in answers if isinstance(a, Exception)]
    after = read_metrics(embed_server)
    for model in MODELS:
        def delta(metric):
            return {
                key[3]: after[key] - before.get(key, 0.0)
                for key in after if key[0] == metric and key[1] == model
            }

        sequences = delta("embed_sequences_total")
        assert sorted(sequences) == [f"{model}_0_0", f"{model}_0_1"], sequences
        assert all(v > 0 for v in sequences.values()), f"an instance got no work: {sequences}"
        assert sum(sequences.values()) == len(sent[model])
        tokens = sum(len(ids) for ids in reference(model).tokenize(sent[model]))
        assert sum(delta("embed_tokens_total").values()) == tokens
        assert sum(delta("embed_forward_passes_total").values()) >= 1
        assert sum(delta("embed_failures_total").values()) == 0
        assert {key[2] for key in after if key[1] == model} == {"cpu"}
        counted = model_stats_once_counted(embed_server, model, stats_before[model][0] + len(sent[model]) // 3)
        requests, executions = (a - b for a, b in zip(counted, stats_before[model]))
        assert requests == len(sent[model]) // 3
        assert executions < requests, "the dynamic batcher never merged two requests"


PHASE_COUNTERS = ("embed_prep_seconds_total", "embed_compute_seconds_total")


@pytest.mark.parametrize("model", MODELS)
def test_phase_seconds_fit_in_the_wall_time_of_the_requests(embed_server, make_sequences, model):
    """Every instance exports embed_prep_seconds_total and embed_compute_seconds_total; both grow
    with requests, and what they grew by is no more than the wall time of those requests. The
    requests go one at a time, so at most one execute runs at any moment across the instances and
    the sum over instances is bounded by the wall time (seconds counted twice, or in the wrong
    unit, would break it)."""
    before = read_metrics(embed_server)
    for name in PHASE_COUNTERS:
        assert {key[3] for key in before if key[0] == name and key[1] == model} == {f"{model}_0_0", f"{model}_0_1"}
    requests = split(make_sequences(model, 40, seed=23, hi=300 if model == "dnabert_s" else 120), [8])
    started = time.perf_counter()
    for seqs in requests:
        infer_grpc(embed_server, model, seqs)
    wall = time.perf_counter() - started
    after = read_metrics(embed_server)
    grown = {name: sum(after[key] - before.get(key, 0.0) for key in after if key[0] == name and key[1] == model)
             for name in PHASE_COUNTERS}
    assert all(v > 0 for v in grown.values()), grown
    assert grown["embed_prep_seconds_total"] + grown["embed_compute_seconds_total"] <= wall, (grown, wall)


# ------------------------------------------------------------------ bad requests

TOO_LONG = {"esm2": 1022, "dnabert_s": 10_000}
GOOD = {"esm2": "MKTAYIAKQRQISFVKSHFSRQ", "dnabert_s": "ACGTACGGTACCATGCA"}


def bad_cases(model):
    """(id, kwargs for infer_grpc, words the error must contain)."""
    good, limit = GOOD[model], TOO_LONG[model]
    bad_letter = "J" if model == "dnabert_s" else "1"
    return [
        ("bad-letter", dict(sequences=[good, good[:5] + bad_letter + good[5:]]), ["sequence 1", repr(bad_letter)]),
        ("empty", dict(sequences=[""]), ["sequence 0", "empty"]),
        ("too-long", dict(sequences=[good[0] * (limit + 1)]), [str(limit), str(limit + 1)]),
        ("not-utf8", dict(sequences=[b"\xff\xfeAC"]), ["UTF-8"]),
        ("wrong-name", dict(sequences=[good], name="SEQ"), ["SEQ"]),
        ("wrong-datatype", dict(sequences=[good], datatype="INT32", data=np.zeros((1, 1), np.int32)), ["INT32"]),
        ("wrong-shape", dict(sequences=[good], shape=[1, 2], data=np.array([[b"AC", b"GT"]], dtype=object)),
         ["shape"]),
    ]


@pytest.mark.parametrize("model", MODELS)
def test_bad_requests_get_clear_errors_and_the_server_goes_on(embed_server, reference, model):
    for case, kwargs, words in bad_cases(model):
        with pytest.raises(InferenceServerException) as info:
            infer_grpc(embed_server, model, **kwargs)
        message = info.value.message()
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT", (case, message)
        for word in words:
            assert word in message, (case, message)
        got = infer_grpc(embed_server, model, [GOOD[model]])
        np.testing.assert_allclose(got, reference(model).embed([GOOD[model]]), atol=TOLERANCE, rtol=0)


def test_bad_sequence_over_json_is_http_400(embed_server):
    body = {"inputs": [{"name": "SEQUENCE", "shape": [1, 1], "datatype": "BYTES", "data": ["MK#L"]}]}
    status, answer = post_json(f"{embed_server.http_url}/v2/models/esm2/infer", body)
    assert status == 400
    assert "esm2" in answer["error"] and "'#'" in answer["error"]


@pytest.mark.parametrize("model", MODELS)
def test_a_bad_request_fails_alone_within_a_batch(embed_server, reference, make_sequences, model):
    good = make_sequences(model, 60, seed=11, hi=80)
    requests = split(good, [2, 3, 1])
    bad_every = 3
    for i in range(0, len(requests), bad_every):
        requests[i] = requests[i][:1] + ["", "x" * 3] + requests[i][1:]  # "" is invalid for both
    requests_before, executions_before = model_stats(embed_server, model)
    answers = send_concurrently(lambda seqs: infer_grpc(embed_server, model, seqs), requests, threads=12)
    requests_after, executions_after = model_stats_once_counted(embed_server, model, requests_before + len(requests))
    core = reference(model)
    for i, (seqs, got) in enumerate(zip(requests, answers)):
        if i % bad_every == 0:
            assert isinstance(got, InferenceServerException), got
            assert "sequence 1" in got.message() and "empty" in got.message()
        else:
            assert not isinstance(got, Exception), got
            np.testing.assert_allclose(got, core.embed(seqs), atol=TOLERANCE, rtol=0)
    # Fewer executions than requests: requests (good and bad) shared batches. Triton 2.51
    # counts a request answered with an error by the Python model as a success.
    assert requests_after - requests_before == len(requests)
    assert executions_after - executions_before < len(requests)


# ------------------------------------------------------------------ the launcher


def embed_server_command(repository, ports, *extra):
    return [
        sys.executable, "-m", "embed_server.cli", "--model-repository", str(repository), "--cpu",
        "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), *extra,
    ]


def drop_tensor(checkpoint_dir):
    """Removes one encoder tensor from a HF checkpoint (safetensors or .bin); returns its name."""
    import torch

    path = checkpoint_dir / "model.safetensors"
    if path.exists():
        from safetensors.torch import load_file, save_file

        state = load_file(path)
    else:
        path = checkpoint_dir / "pytorch_model.bin"
        state = torch.load(path, weights_only=True)
    name = next(k for k in sorted(state) if "layer.0." in k and k.endswith("weight"))
    del state[name]
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return name


def test_embed_server_names_each_model_that_cannot_load(tmp_path, demo_checkpoints):
    import shutil

    from embed_server.launcher import free_ports
    from embed_server.repository import assemble_repository

    repo = assemble_repository(tmp_path / "repo", {m: demo_checkpoints / m for m in MODELS}, cpu_instances=1)
    shutil.rmtree(repo / "esm2" / "checkpoint")
    dropped = drop_tensor(repo / "dnabert_s" / "checkpoint")
    done = subprocess.run(
        embed_server_command(repo, free_ports(3)), capture_output=True, text=True, timeout=240
    )
    assert done.returncode != 0
    err = done.stderr
    assert "esm2:" in err and "does not exist" in err and str(repo / "esm2" / "checkpoint") in err, err
    assert "dnabert_s:" in err and dropped.rsplit(".", 1)[0] in err, err
    assert "+---" not in err and len(err.splitlines()) < 15, err


def test_embed_server_serves_until_sigterm_and_leaves_nothing(tmp_path, demo_checkpoints):
    psutil = pytest.importorskip("psutil")
    from embed_server.launcher import free_ports
    from embed_server.repository import assemble_repository

    repo = assemble_repository(tmp_path / "repo", {"dnabert_s": demo_checkpoints / "dnabert_s"}, cpu_instances=1)
    ports = free_ports(3)
    process = subprocess.Popen(embed_server_command(repo, ports), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("metrics"):
                break
        assert any(f"127.0.0.1:{ports[1]}" in line for line in lines), lines + [process.stderr.read()]
        children = psutil.Process(process.pid).children(recursive=True)
        assert children, "no tritonserver child"

        class Server:
            grpc_url = f"127.0.0.1:{ports[1]}"

        got = infer_grpc(Server, "dnabert_s", ["ACGTTGCA"])
        assert got.shape[0] == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running: {alive}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
