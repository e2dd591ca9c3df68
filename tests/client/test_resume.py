"""Faults and scale-out against real tritonservers.

- A server is killed (SIGKILL) in the middle of a run: the client, with few retries, exits
  non-zero and leaves a resumable directory; the server is restarted and `--resume`
  completes with no frame lost, duplicated or recomputed twice.
- Two servers (the session's and this module's own): both get work (their /metrics
  counters move) and the output is complete.
The kill test uses its own server (never the session's), started and killed here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from embed_client import cli
from embed_client.progress import parse_tokens_per_gpu

from test_end_to_end import assert_complete_output, expected_frames, write_sample

pytestmark = pytest.mark.server


class SpareServer:
    """A tritonserver of our own on fresh free ports: start, kill -9, start again."""

    def __init__(self, repository: Path, log_dir: Path):
        self.repository = repository
        self.log_dir = log_dir
        self.server = None
        self.starts = 0

    def start(self) -> "SpareServer":
        from embed_server.launcher import ServerOptions, TritonServer, free_ports

        http, grpc, metrics = free_ports(3)
        self.starts += 1
        self.server = TritonServer(ServerOptions(
            model_repository=self.repository, http_port=http, grpc_port=grpc,
            metrics_port=metrics, cpu=True, startup_timeout_s=300,
            log_file=self.log_dir / f"tritonserver-{self.starts}.log"))
        self.server.start()
        return self

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash, not a graceful stop)."""
        os.killpg(self.server.process.pid, signal.SIGKILL)
        self.server.stop()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def ensure_running(self) -> "SpareServer":
        """Start it again if an earlier test left it killed."""
        process = self.server.process if self.server is not None else None
        return self if process is not None and process.poll() is None else self.start()

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url

    @property
    def metrics_url(self) -> str:
        return self.server.metrics_url


@pytest.fixture(scope="module")
def spare(demo_repository, tmp_path_factory):
    server = SpareServer(demo_repository, tmp_path_factory.mktemp("spare_server")).start()
    yield server
    server.stop()


def sequences_total(metrics_url: str) -> float:
    """embed_sequences_total summed over models, GPUs and instances."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "embed_sequences_total")


def manifest_blocks(out: Path) -> int:
    try:
        return len((out / "manifest.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def test_server_killed_mid_run_then_resume(spare, embed_server, tmp_path):
    sample = write_sample(tmp_path / "S1.fasta", n=120, seed=3)
    out = tmp_path / "out"
    frames = len(expected_frames(sample))
    # One sequence per request, one request in flight: slow enough to be killed midway.
    argv = ["--sample", str(sample), "--out", str(out), "--window", "16",
            "--token-budget", "1", "--max-in-flight", "1", "--retries", "1",
            "--progress", "plain", "--log-interval", "1"]
    client = subprocess.Popen(
        [sys.executable, "-m", "embed_client.cli", *argv, "--server", spare.grpc_url,
         "--metrics-url", spare.metrics_url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while manifest_blocks(out) < 2 and client.poll() is None:
            assert time.monotonic() < deadline, "the client committed no block in time"
            time.sleep(0.05)
        assert client.poll() is None, f"the run ended before the kill: {client.communicate()}"
        spare.kill()
        stdout, stderr = client.communicate(timeout=120)
    finally:
        if client.poll() is None:
            client.kill()
    assert client.returncode == cli.EXIT_SERVER, stderr
    assert "--resume" in stderr and "unavailable" in stderr

    # A resumable state, and nothing that looks finished.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["resumable"] is True
    assert not (out / "esm2.parquet").exists() and not (out / "dnabert_s.parquet").exists()
    committed = manifest_blocks(out)
    assert 2 <= committed < -(-frames // 16)

    spare.start()  # a new server process (new ports): nothing of the old one survives
    code = cli.run(cli.build_parser().parse_args(
        argv[:4] + ["--window", "16", "--resume", "--server", spare.grpc_url,
                    "--metrics-url", spare.metrics_url, "--progress", "plain"]))
    assert code == cli.EXIT_OK
    assert_complete_output(out, sample, embed_server.checkpoints, embed_server.hidden_sizes)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["resumed"]["blocks"] >= committed  # finished blocks were not recomputed
    resumed = summary["resumed"]["frames"]
    for model, sent in summary["stages"]["send"].items():
        assert sent["sequences_sent"] == sent["sequences_received"] == frames - resumed
        assert summary["stages"]["write"][model]["rows_final"] == frames

    # Resuming a complete run changes nothing.
    before = (out / "esm2.parquet").stat().st_mtime_ns
    assert cli.run(cli.build_parser().parse_args(
        argv[:4] + ["--window", "16", "--resume", "--server", spare.grpc_url])) == cli.EXIT_OK
    assert (out / "esm2.parquet").stat().st_mtime_ns == before


def test_two_servers_share_the_work(spare, embed_server, tmp_path):
    spare.ensure_running()
    sample = write_sample(tmp_path / "S2.fasta", n=60, seed=5)
    out = tmp_path / "out"
    servers = [(embed_server.grpc_url, embed_server.metrics_url),
               (spare.grpc_url, spare.metrics_url)]
    before = [sequences_total(metrics) for _, metrics in servers]
    argv = ["--sample", str(sample), "--out", str(out), "--window", "16",
            "--token-budget", "400", "--max-in-flight", "2", "--progress", "plain"]
    for grpc, metrics in servers:
        argv += ["--server", grpc, "--metrics-url", metrics]
    assert cli.run(cli.build_parser().parse_args(argv)) == cli.EXIT_OK
    after = [sequences_total(metrics) for _, metrics in servers]
    assert all(b > a for a, b in zip(before, after)), (before, after)

    frames = assert_complete_output(out, sample, embed_server.checkpoints,
                                    embed_server.hidden_sizes)
    summary = json.loads((out / "summary.json").read_text())
    detail = summary["servers_detail"]
    assert all(sum(d["sequences"].values()) > 0 for d in detail.values()), detail
    assert sum(sum(d["sequences"].values()) for d in detail.values()) == 2 * len(frames)
    with urllib.request.urlopen(spare.metrics_url, timeout=10) as response:
        per_gpu = parse_tokens_per_gpu(response.read().decode())
    assert per_gpu.get("cpu", 0) > 0  # the progress view's per-GPU source
