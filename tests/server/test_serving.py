"""The Triton-free parts of serving: model.py's helpers, repository assembly, launcher pieces."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from embed_core import serving
from embed_core.errors import InvalidSequenceError, SequenceTooLargeError
from embed_server import launcher
from embed_server.repository import (
    assemble_repository, set_instance_count, set_output_dims, set_parameter, source_repository,
)

MODEL_CONFIG = {
    "parameters": {
        "checkpoint": {"string_value": "checkpoint"},
        "dtype": {"string_value": "float32"},
        "token_budget": {"string_value": "auto"},
        "max_length": {"string_value": "50"},
    },
    "output": [{"name": "EMBEDDING", "data_type": "TYPE_FP32", "dims": ["-1"]}],
    "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
}


# ------------------------------------------------------------------ model.py helpers


def test_parameters_become_a_runtime_config():
    params = serving.config_parameters(MODEL_CONFIG)
    config = serving.runtime_options(params, "cpu")
    assert (config.device, config.dtype, config.token_budget, config.max_length, config.too_long) == (
        "cpu", "float32", None, 50, "error")
    with pytest.raises(ValueError, match="token_budget"):
        serving.runtime_options({"token_budget": "lots"}, "cpu")
    with pytest.raises(ValueError, match="dtype"):
        serving.runtime_options({"dtype": "float8"}, "cpu")
    assert config.attention == "auto"
    assert serving.runtime_options({"attention": "flex"}, "cpu").attention == "flex"
    with pytest.raises(ValueError, match="attention"):
        serving.runtime_options({"attention": "sparse"}, "cpu")
    assert config.kernels == "auto"
    assert serving.runtime_options({"kernels": "torch"}, "cpu").kernels == "torch"
    with pytest.raises(ValueError, match="kernels"):
        serving.runtime_options({"kernels": "cuda"}, "cpu")


def test_the_attention_parameter_reaches_the_encoder():
    """RuntimeConfig.attention reaches the encoder through the execution plan."""
    from embed_core.dnabert_s import DnabertSConfig
    from embed_core.dnabert_s_checkpoint import random_dnabert_s
    from embed_core.runtime import Embedder, RuntimeConfig

    model = random_dnabert_s(DnabertSConfig(vocab_size=16, hidden_size=24, num_hidden_layers=1,
                                            num_attention_heads=12, intermediate_size=32))
    embedder = Embedder(model, tokenizer=None, config=RuntimeConfig(device="cpu", attention="padded"))
    assert model.plan is embedder.plan and model.plan.attention == "padded"


def test_checkpoint_path_resolves_against_the_model_folder(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    assert serving.checkpoint_path({}, tmp_path) == tmp_path / "checkpoint"
    assert serving.checkpoint_path({"checkpoint": str(tmp_path)}, "/elsewhere") == tmp_path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        serving.checkpoint_path({"checkpoint": "nope"}, tmp_path)


def test_embedding_dims_must_match_the_checkpoint_unless_variable():
    assert serving.embedding_dims_problem(MODEL_CONFIG, "EMBEDDING", 64) is None
    fixed = {"output": [{"name": "EMBEDDING", "dims": ["2560"]}]}
    assert serving.embedding_dims_problem(fixed, "EMBEDDING", 2560) is None
    assert "2560" in serving.embedding_dims_problem(fixed, "EMBEDDING", 64)


def test_decode_sequences():
    ok = np.array([[b"ACGT"], [b"acg"]], dtype=object)
    assert serving.decode_sequences(ok) == ["ACGT", "acg"]
    assert serving.decode_sequences(np.array([b"A", b"C"], dtype=object)) == ["A", "C"]
    assert "no input tensor" in str(serving.decode_sequences(None))
    assert "UTF-8" in str(serving.decode_sequences(np.array([[b"\xff"]], dtype=object)))
    assert "shape" in str(serving.decode_sequences(np.array([[b"A", b"C"]], dtype=object)))


def test_numpy_problem_names_the_fix(monkeypatch):
    assert serving.numpy_problem() is None  # this environment has numpy<2
    monkeypatch.setattr(np, "__version__", "2.1.0")
    assert "numpy<2" in serving.numpy_problem()


@pytest.fixture(scope="module")
def embedder(demo_checkpoints):
    from embed_core.models import load_embedder
    from embed_core.runtime import RuntimeConfig

    return load_embedder("esm2", demo_checkpoints / "esm2", RuntimeConfig(device="cpu", dtype="float32"))


def test_launch_requests_fails_only_the_bad_requests(embedder):
    requests = [["MKTAY", "MKL"], ["MK1"], serving.RequestError("broken"), ["ACDEFG"]]
    results = serving.launch_requests(embedder, requests).finish()
    np.testing.assert_allclose(results[0].mean, embedder.embed(["MKTAY", "MKL"]), atol=1e-5, rtol=0)
    assert isinstance(results[1], InvalidSequenceError) and "sequence 0" in str(results[1])
    assert results[2] is requests[2]
    np.testing.assert_allclose(results[3].mean, embedder.embed(["ACDEFG"]), atol=1e-5, rtol=0)
    assert all(serving.is_client_error(r) for r in results[1:3])


def test_a_sequence_too_large_for_the_device_fails_only_its_request(embedder):
    import torch

    def fail_long(batch):  # as if a pack holding the 30-residue sequence ran out of memory
        if int(batch.max_seqlen) > 30:
            raise torch.cuda.OutOfMemoryError("injected")

    embedder.before_forward = fail_long
    try:
        results = serving.launch_requests(embedder, [["MKTAY"], ["MKTAY", "A" * 30], ["MKL"]]).finish()
    finally:
        embedder.before_forward = None
    assert isinstance(results[1], SequenceTooLargeError) and str(results[1]).startswith("sequence 1:")
    np.testing.assert_allclose(results[2].mean, embedder.embed(["MKL"]), atol=1e-5, rtol=0)
    assert serving.is_client_error(results[1])


def test_metric_deltas_follow_the_stats(embedder):
    deltas = serving.MetricDeltas()
    deltas.take(embedder.stats)
    embedder.embed(["MKTAY", "MKL"])
    got = deltas.take(embedder.stats)
    assert got["embed_sequences_total"] == 2 and got["embed_tokens_total"] == 5 + 3 + 4
    assert "embed_failures_total" not in got
    assert deltas.take(embedder.stats) == {}


def test_phase_seconds_split_the_wall_time_and_become_counters(embedder):
    """launch_requests adds its tokenizing (prep) and encoder (compute) seconds to the PhaseSeconds;
    together they are within the call's own wall time, and MetricDeltas turns them (floats) into
    increments of embed_prep/compute_seconds_total beside the EmbedStats counters."""
    import time

    phases = serving.PhaseSeconds()
    deltas = serving.MetricDeltas()
    deltas.take(embedder.stats, phases)
    started = time.perf_counter()
    serving.launch_requests(embedder, [["MKTAY" * 20, "MKL"], ["ACDEFG"]], phases).finish()
    wall = time.perf_counter() - started
    assert phases.prep_seconds > 0 and phases.compute_seconds > 0
    assert phases.prep_seconds + phases.compute_seconds <= wall
    got = deltas.take(embedder.stats, phases)
    assert got["embed_prep_seconds_total"] == phases.prep_seconds
    assert got["embed_compute_seconds_total"] == phases.compute_seconds
    assert got["embed_sequences_total"] == 3
    assert deltas.take(embedder.stats, phases) == {}
    assert {field for field, _ in serving.METRICS.values()} <= set(embedder.stats.as_dict()) | set(phases.as_dict())


# ------------------------------------------------------------------ the repository


def test_config_edits():
    text = (source_repository() / "esm2" / "configs" / "cpu.pbtxt").read_text()
    edited = set_instance_count(set_output_dims(set_parameter(text, "checkpoint", "x.pt"), "EMBEDDING", 64), 1)
    assert 'string_value: "x.pt"' in edited and "dims: [ 64 ]" in edited and "count: 1" in edited
    assert "dims: [ 1 ]" in edited  # the input is untouched
    with pytest.raises(ValueError):
        set_parameter(text, "no_such_key", "x")


def test_repository_configs_agree():
    for model in ("esm2", "dnabert_s"):
        gpu = (source_repository() / model / "config.pbtxt").read_text()
        cpu = (source_repository() / model / "configs" / "cpu.pbtxt").read_text()
        assert "KIND_GPU" in gpu and "gpus:" not in gpu and "KIND_CPU" in cpu
        strip = lambda t: [line for line in t.splitlines() if not line.startswith("#")]  # noqa: E731
        assert strip(gpu.replace("count: 1", "count: 2").replace("KIND_GPU", "KIND_CPU")) == strip(cpu)


def test_assemble_repository_with_a_fair_esm_file(tmp_path, demo_checkpoints):
    repo = assemble_repository(tmp_path / "repo", {"esm2": demo_checkpoints / "esm2_fair.pt"})
    assert (repo / "esm2" / "checkpoint.pt").is_file() and (repo / "esm2" / "1" / "model.py").is_file()
    for config in ("config.pbtxt", "configs/cpu.pbtxt"):
        assert 'string_value: "checkpoint.pt"' in (repo / "esm2" / config).read_text()
    with pytest.raises(FileExistsError):
        assemble_repository(tmp_path / "repo", {"esm2": demo_checkpoints / "esm2_fair.pt"})
    linked = assemble_repository(tmp_path / "repo", {"esm2": demo_checkpoints / "esm2"}, symlink=True, overwrite=True)
    assert (linked / "esm2" / "checkpoint").is_symlink()


def _parameter(pbtxt: str, key: str) -> str:
    import re

    match = re.search(r'key:\s*"' + key + r'"\s*value:\s*\{\s*string_value:\s*"([^"]*)"', pbtxt)
    return match.group(1) if match else None


def test_assemble_repository_sets_gpu_instances_and_parameters(tmp_path, demo_checkpoints):
    import re

    checkpoints = {m: demo_checkpoints / m for m in ("esm2", "dnabert_s")}
    repo = assemble_repository(tmp_path / "repo", checkpoints, gpu_instances=3, cpu_instances=2,
                               parameters={"dnabert_s": {"attention": "flex", "token_budget": "4096"}})
    for model in ("esm2", "dnabert_s"):
        gpu = (repo / model / "config.pbtxt").read_text()
        cpu = (repo / model / "configs" / "cpu.pbtxt").read_text()
        assert re.search(r"count:\s*3\s*kind:\s*KIND_GPU", gpu), gpu
        assert re.search(r"count:\s*2\s*kind:\s*KIND_CPU", cpu), cpu
        for text in (gpu, cpu):
            assert _parameter(text, "checkpoint") == "checkpoint"
            if model == "dnabert_s":
                assert _parameter(text, "attention") == "flex" and _parameter(text, "token_budget") == "4096"
            else:  # parameters are per model
                assert _parameter(text, "token_budget") == "auto"
    # Per model: only the named model's GPU count changes.
    repo = assemble_repository(tmp_path / "repo2", checkpoints, gpu_instances={"dnabert_s": 3})
    assert re.search(r"count:\s*3\s*kind:\s*KIND_GPU", (repo / "dnabert_s" / "config.pbtxt").read_text())
    assert re.search(r"count:\s*1\s*kind:\s*KIND_GPU", (repo / "esm2" / "config.pbtxt").read_text())
    plain = assemble_repository(tmp_path / "plain", {"esm2": demo_checkpoints / "esm2"})
    assert re.search(r"count:\s*1\s*kind:\s*KIND_GPU", (plain / "esm2" / "config.pbtxt").read_text())


@pytest.mark.parametrize("parameters, words", [
    ({"dnabert_s": {"atention": "flex"}}, ["dnabert_s", "'atention'", "attention"]),  # a typo: the keys it has
    ({"esm2": {"attention": "flex"}}, ["esm2", "'attention'"]),                        # DNABERT-S only
    ({"dnabert_s": {"checkpoint": "x"}}, ["dnabert_s", "checkpoint"]),
    ({"nope": {"dtype": "float32"}}, ["'nope'"]),
])
def test_assemble_repository_refuses_unknown_parameters_before_writing(tmp_path, demo_checkpoints, parameters, words):
    out = tmp_path / "repo"
    with pytest.raises(ValueError) as info:
        assemble_repository(out, {m: demo_checkpoints / m for m in ("esm2", "dnabert_s")}, parameters=parameters)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert not out.exists()


# ------------------------------------------------------------------ the launcher


def test_failures_from_the_log_read_as_one_line_per_model():
    log = (
        'E1128 15:33:15.181631 5873 model_lifecycle.cc:642] "failed to load \'esm2\' version 1: Internal: '
        'TritonModelException: CheckpointError: /r/esm2/checkpoint lacks encoder.layer.0.weight'
        '\\n\\nAt:\\n  /r/esm2/1/model.py(4): initialize\\n"\n'
    )
    failures = launcher.failures_from_log(log)
    assert list(failures) == ["esm2"]
    assert launcher.format_failures(failures).splitlines()[1] == (
        "  esm2: CheckpointError: /r/esm2/checkpoint lacks encoder.layer.0.weight")


def test_binary_and_backend_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITONSERVER", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    binary = launcher.find_tritonserver()
    assert binary.name == "tritonserver"
    backends = launcher.assemble_backends(binary, tmp_path / "backends")
    stub = backends / "python" / "triton_python_backend_stub"
    assert stub.is_file() and os.access(stub, os.X_OK)
    assert (backends / "python" / "libtriton_python.so").is_file()
    monkeypatch.setenv("TRITONSERVER", str(tmp_path / "missing"))
    with pytest.raises(launcher.LaunchError, match="TRITONSERVER"):
        launcher.find_tritonserver()


def test_stub_environment_is_this_python(monkeypatch):
    env = launcher.server_env(launcher.find_tritonserver())
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    assert "nvidia_pytriton.libs" in env["LD_LIBRARY_PATH"]
    launcher.check_stub_python(env)  # numpy<2 and the right Python here
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert launcher.gpu_visible() is False


def test_options_are_checked(tmp_path):
    with pytest.raises(launcher.LaunchError, match="not a directory"):
        launcher.ServerOptions(model_repository=tmp_path / "nope")
    with pytest.raises(launcher.LaunchError, match="must differ"):
        launcher.ServerOptions(model_repository=tmp_path, http_port=1, grpc_port=1, metrics_port=2)


def test_cli_help_shows_defaults():
    from embed_server.cli import build_parser

    text = build_parser().format_help()
    for flag in ("--model-repository", "--cpu", "--tritonserver", "--http-port", "(default: 8000)"):
        assert flag in text
    args = build_parser().parse_args(["--model-repository", "r"])
    assert args.cpu is None and args.grpc_port == 8001 and args.metrics_port == 8002
    assert json.dumps(vars(args), default=str)


def test_launcher_refuses_numpy_2_for_the_stub(tmp_path):
    fake = tmp_path / "python3"  # stands for an environment whose python3 has numpy 2
    fake.write_text(f"#!/bin/sh\necho '{launcher.stub_python_version()} 2.1.0'\n")
    fake.chmod(0o755)
    with pytest.raises(launcher.LaunchError, match=r"numpy 2\.1\.0 .*numpy<2"):
        launcher.check_stub_python({"PATH": str(tmp_path)})
    fake.write_text("#!/bin/sh\necho '3.7 1.26.4'\n")
    with pytest.raises(launcher.LaunchError, match="Python 3.7"):
        launcher.check_stub_python({"PATH": str(tmp_path)})


def test_a_malformed_request_counts_as_a_failure(embedder):
    deltas = serving.MetricDeltas()
    deltas.take(embedder.stats)
    serving.launch_requests(embedder, [serving.RequestError("not UTF-8"), ["MKL"]]).finish()
    got = deltas.take(embedder.stats)
    assert got["embed_failures_total"] == 1 and got["embed_sequences_total"] == 1


class _FakePbUtils:
    """The few `triton_python_backend_utils` names that initialize() uses."""

    class TritonModelException(Exception):
        pass

    @staticmethod
    def triton_string_to_numpy(name):
        return {"TYPE_FP32": np.float32}[name]


def test_model_with_wrong_dims_is_refused_before_the_warmup(demo_checkpoints, monkeypatch):
    from embed_core import runtime, triton_model

    warmups = []
    monkeypatch.setattr(runtime.Embedder, "warmup", lambda self: warmups.append(1))
    monkeypatch.setattr(serving, "place_instance", lambda kind, device_id, config: ("cpu", "cpu"))
    config = {
        "input": [{"name": "SEQUENCE", "data_type": "TYPE_STRING", "dims": ["1"]}],
        "output": [{"name": "EMBEDDING", "data_type": "TYPE_FP32", "dims": ["7"]}],
        "parameters": {"checkpoint": {"string_value": str(demo_checkpoints / "esm2")},
                       "dtype": {"string_value": "float32"}},
    }
    model = triton_model.triton_model_class(_FakePbUtils, "esm2")()
    args = {"model_config": json.dumps(config), "model_name": "esm2", "model_instance_kind": "CPU",
            "model_instance_device_id": "0", "model_repository": str(demo_checkpoints),
            "model_instance_name": "esm2_0"}
    with pytest.raises(_FakePbUtils.TritonModelException, match=r"dims \[7\]"):
        model.initialize(args)
    assert warmups == []  # the warmup (compilation on GPU) is not paid for a model refused anyway


def test_launcher_failure_before_the_child_runs_is_a_launch_error_and_leaves_no_workdir(
        tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    repo = tmp_path / "repo"
    repo.mkdir()
    server = launcher.TritonServer(launcher.ServerOptions(
        model_repository=repo, cpu=True, log_file=tmp_path / "missing" / "server.log"))
    with pytest.raises(launcher.LaunchError, match="server.log"):
        server.start()
    assert list((tmp_path / "tmp").iterdir()) == []

    def no_backend(binary, out_dir):
        raise launcher.LaunchError("no Python backend")

    monkeypatch.setattr(launcher, "assemble_backends", no_backend)
    with pytest.raises(launcher.LaunchError, match="no Python backend"):
        launcher.TritonServer(launcher.ServerOptions(model_repository=repo, cpu=True)).start()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_wait_ready_asks_again_when_the_index_is_not_answered(tmp_path, monkeypatch):
    answers = {"index": [(0, None), (200, [{"name": "esm2", "state": "READY"}])]}

    def fake_http(url, data=None, timeout=5.0):
        if url.endswith("/v2/repository/index"):
            return answers["index"].pop(0)
        return 200, None

    monkeypatch.setattr(launcher, "http_request", fake_http)
    server = launcher.TritonServer(launcher.ServerOptions(model_repository=tmp_path))
    server.process = type("Running", (), {"poll": staticmethod(lambda: None)})()
    server.wait_ready()
    assert server.models == ["esm2"]


@pytest.mark.parametrize("child_code, expected", [(0, 0), (3, 3), (-9, 137)])
def test_server_cli_exit_code_of_a_child_killed_by_a_signal(tmp_path, monkeypatch, child_code, expected):
    from embed_server import cli

    class FakeServer:
        use_cpu_configs, models, log_path = True, ["esm2"], None

        def __init__(self, options):
            self.options = options

        def start(self):
            return self

        def endpoints(self):
            return ""

        def wait(self):
            return child_code

        def stop(self):
            return child_code

    monkeypatch.setattr(cli, "TritonServer", FakeServer)
    assert cli.run(cli.build_parser().parse_args(["--model-repository", str(tmp_path)])) == expected


def test_a_request_over_max_request_tokens_fails_alone(embedder):
    """One request may not hold an instance for long: over the cap it gets a clear error naming the
    cap; the other requests of the execute are embedded."""
    results = serving.launch_requests(embedder, [["MKTAY"], ["MKTAYW" * 4] * 3, ["MKL"]], max_tokens=40).finish()
    assert isinstance(results[1], serving.RequestError) and serving.is_client_error(results[1])
    assert "78 tokens" in str(results[1]) and "max_request_tokens 40" in str(results[1])
    np.testing.assert_allclose(results[0].mean, embedder.embed(["MKTAY"]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(results[2].mean, embedder.embed(["MKL"]), atol=1e-5, rtol=0)
    assert serving.max_request_tokens({}) == serving.DEFAULT_MAX_REQUEST_TOKENS
    assert serving.max_request_tokens({"max_request_tokens": "64"}) == 64
    with pytest.raises(ValueError, match="max_request_tokens"):
        serving.max_request_tokens({"max_request_tokens": "0"})


def test_cancelled_requests_are_not_computed(embedder, monkeypatch):
    """A request cancelled before its execute is not tokenized; one cancelled while its forwards
    run has its packs skipped where they hold nobody else's rows (asked between forwards), and is
    answered RequestCancelled; the live request is embedded as usual."""
    monkeypatch.setattr(embedder, "token_budget", 8)     # one forward per sequence: cancellation between them
    before = embedder.stats.cancelled
    asked = {"n": 0}

    def gone_after_first_forward():
        asked["n"] += 1
        return embedder.stats.forward_passes > forwards_at_start

    forwards_at_start = embedder.stats.forward_passes
    requests = [["MKL"], ["MKTAY", "MKTAYW", "MKTAYWV"], ["ACD"]]
    launched = serving.launch_requests(embedder, requests, cancelled=[lambda: True, gone_after_first_forward,
                                                                      lambda: False])
    results = launched.finish()
    assert isinstance(results[0], serving.RequestCancelled) and isinstance(results[1], serving.RequestCancelled)
    np.testing.assert_allclose(results[2].mean, embedder.embed(["ACD"]), atol=1e-5, rtol=0)
    assert asked["n"] >= 2
    assert embedder.stats.cancelled - before >= 2       # request 1's later forwards were skipped


def test_request_options_and_what_each_request_gets(embedder):
    """The KServe parameters "layer" and "include" of each request: checked one by one (a bad one
    fails only its request), grouped by layer into core calls, and each request gets what it asked."""
    layers = embedder.num_layers
    assert serving.request_options("", layers) == serving.RequestOptions()
    asked = serving.request_options('{"include": "per_token,bos", "layer": 1}', layers)
    assert asked == serving.RequestOptions(1, ("mean", "per_token", "bos"))
    for bad, message in (('{"include": "logits"}', "logits is not one of"), ('{"layer": 99}', "outside"),
                         ('{"layer": "x"}', "not an integer"), ("{not json", "not valid JSON")):
        err = serving.request_options(bad, layers)
        assert isinstance(err, serving.RequestError) and message in str(err), (bad, err)
    sequences = [["MKTAY", "MKL"], ["ACDEFG"], ["MKL"]]
    options = [serving.RequestOptions(), serving.RequestOptions(1, ("mean", "per_token", "bos")),
               serving.RequestOptions(None, ("mean", "per_token"))]
    results = serving.launch_requests(embedder, sequences, options=options).finish()
    assert results[0].bos is None and results[0].tokens is None
    np.testing.assert_allclose(results[0].mean, embedder.embed(["MKTAY", "MKL"]), atol=1e-5, rtol=0)
    layer1 = embedder.launch_tokens(embedder.tokenize(["ACDEFG"]), layer=1, include=("per_token", "bos")).outputs()
    np.testing.assert_allclose(results[1].mean, layer1["mean"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(results[1].bos, layer1["bos"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(results[1].tokens[0], layer1["per_token"], atol=1e-6, rtol=0)
    assert results[1].tokens[0].shape == (6, embedder.hidden_size)          # residues only
    np.testing.assert_allclose(results[2].tokens[0].mean(0), results[2].mean[0], atol=1e-5, rtol=0)
    padded, counts = serving.pad_token_rows(results[1].tokens + results[2].tokens, np.float32)
    assert padded.shape == (2, 6, embedder.hidden_size) and counts.tolist() == [[6], [3]]
    assert not padded[1, 3:].any()
