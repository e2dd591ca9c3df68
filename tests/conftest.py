"""Session fixtures shared by every test folder: demo checkpoints and ONE real tritonserver.

The server starts lazily, the first time a test asks for `embed_server`, and serves both
models (esm2, dnabert_s) from small random checkpoints in the published layouts, on
CPU instances (configs/cpu.pbtxt: two instances per model), on free ports.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import pytest

MODELS = ("esm2", "dnabert_s")


def pytest_configure(config):
    """One torch thread in the test process: on a 2-core CI machine that also runs the
    tritonserver stubs, torch's default thread pool oversubscribes the cores (measured: a
    matmul 4x slower with 2 threads than with 1 there).

    Without CUDA, our Triton kernels run under Triton's interpreter (tests/core/test_kernels.py):
    TRITON_INTERPRET=1 must be set before triton is first imported; an explicit value wins."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@dataclasses.dataclass(frozen=True)
class RunningServer:
    """Where the session's tritonserver listens, and what it serves."""

    http_url: str          # "http://127.0.0.1:<port>" (KServe v2 REST)
    grpc_url: str          # "127.0.0.1:<port>" (tritonclient.grpc's url form)
    metrics_url: str       # "http://127.0.0.1:<port>/metrics"
    http_port: int
    grpc_port: int
    metrics_port: int
    repository: Path       # the assembled model repository
    checkpoints: Path      # the demo checkpoints (dnabert_s/, esm2/, esm2_fair.pt)
    hidden_sizes: dict     # {model: embedding width}
    log_path: Path         # tritonserver's log (read it when a test fails)


@pytest.fixture(scope="session")
def demo_checkpoints(tmp_path_factory) -> Path:
    """Small random checkpoints in the exact published layouts (embed_core.demo)."""
    from embed_core.demo import write_demo_checkpoints

    out = tmp_path_factory.mktemp("demo_checkpoints")
    write_demo_checkpoints(out)
    return out


def hidden_size(checkpoint: Path) -> int:
    """The embedding width of a HF checkpoint directory, from its config.json."""
    return int(json.loads((checkpoint / "config.json").read_text())["hidden_size"])


@pytest.fixture(scope="session")
def demo_repository(tmp_path_factory, demo_checkpoints) -> Path:
    """A model repository with both models and the demo checkpoints (HF directories)."""
    from embed_server.repository import assemble_repository

    checkpoints = {m: demo_checkpoints / m for m in MODELS}
    return assemble_repository(
        tmp_path_factory.mktemp("model_repository"),
        checkpoints,
        embedding_dims={m: hidden_size(p) for m, p in checkpoints.items()},
    )


@contextlib.contextmanager
def _start_embed_server(repository, name: str = "embed-server", **options):
    """A ready embed-server (`embed_server.launcher.TritonServer`) on `repository`, on free ports,
    stopped on leaving: CPU configs and a 300 s start-up limit unless `options` say otherwise.
    A port taken between free_ports() and the bind is retried once on new ports; any other
    LaunchError fails the test, naming `name` (and the log, where `log_file` is given)."""
    from embed_server.launcher import LaunchError, free_ports, start_server

    options = {"cpu": True, "startup_timeout_s": 300, **options}
    for attempt in (1, 2):
        http, grpc, metrics = free_ports(3)
        context = start_server(repository, http_port=http, grpc_port=grpc, metrics_port=metrics, **options)
        try:
            server = context.__enter__()
            break
        except LaunchError as err:
            if attempt == 1 and "already in use" in str(err):
                continue
            log = f"\n(log: {options['log_file']})" if options.get("log_file") else ""
            pytest.fail(f"{name} did not start: {err}{log}", pytrace=False)
    try:
        yield server
    finally:
        context.__exit__(None, None, None)


@pytest.fixture(scope="session")
def start_embed_server():
    """`with start_embed_server(repository, name, **ServerOptions fields) as server:` a ready
    embed-server of the test's own (TLS, keys, limits), on free ports, stopped after; see
    _start_embed_server. Usable from fixtures of any scope."""
    return _start_embed_server


@pytest.fixture(scope="session")
def embed_server(tmp_path_factory, demo_checkpoints, demo_repository) -> RunningServer:
    """One real tritonserver for the whole session (CPU configs), stopped at the end."""
    log_path = tmp_path_factory.mktemp("tritonserver") / "tritonserver.log"
    with _start_embed_server(demo_repository, "the session's tritonserver", log_file=log_path) as server:
        o = server.options
        yield RunningServer(
            http_url=server.http_url,
            grpc_url=server.grpc_url,
            metrics_url=server.metrics_url,
            http_port=o.http_port,
            grpc_port=o.grpc_port,
            metrics_port=o.metrics_port,
            repository=demo_repository,
            checkpoints=demo_checkpoints,
            hidden_sizes={m: hidden_size(demo_checkpoints / m) for m in MODELS},
            log_path=log_path,
        )


@pytest.fixture
def disk_full_at_block(monkeypatch):
    """`arm(n)`: the client's n-th block commit fails as a full disk would (ENOSPC); `disarm()`
    puts the real commit back. Returns (arm, disarm)."""
    import errno

    from embed_client.sink import OutputDir

    commit = OutputDir.commit

    def arm(n: int) -> None:
        calls = []

        def full(self, *args, **kwargs):
            calls.append(args[0])
            if len(calls) == n:
                raise OSError(errno.ENOSPC, "No space left on device")
            return commit(self, *args, **kwargs)
        monkeypatch.setattr(OutputDir, "commit", full)

    return arm, monkeypatch.undo


@pytest.fixture(scope="module")
def dead_server():
    """A gRPC address where nothing listens."""
    from embed_server.launcher import free_ports

    return f"127.0.0.1:{free_ports(1)[0]}"
