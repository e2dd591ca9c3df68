"""Faults and scale-out against real tritonservers.

- A server is killed (SIGKILL) in the middle of a run: the client, with few retries, exits
  non-zero and leaves a resumable directory; the server is restarted and `--resume`
  completes with no frame lost, duplicated or recomputed twice.
- Two servers (the session's and this module's own): both get work (their /metrics
  counters move) and the output is complete.
- `--resume` of a finished run contacts no server (--server points where nothing listens),
  changes no file, and writes only the derived files it is asked for and lacks; a run whose
  blocks are all committed is finished without a server; a deleted part is recomputed for
  its model and block only.
The kill test uses its own server (never the session's), started and killed here.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embed_client import cli
from embed_client.classifier import HIGHEST_FILE, PREDICTIONS_FILE
from embed_client.progress import parse_metrics_page
from embed_client.sink import OutputDir

from test_end_to_end import (assert_complete_output, classifier_file, expected_frames,  # noqa: F401
                             read_model_table, run_cli, write_sample)

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


def snapshot(out: Path) -> dict:
    """{relative path: (sha256, mtime_ns)} of every file under `out`."""
    return {str(p.relative_to(out)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                      p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*")) if p.is_file()}


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
        per_gpu, _ = parse_metrics_page(response.read().decode())
    assert per_gpu.get("cpu", 0) > 0  # the progress view's per-GPU source


def test_resume_of_a_complete_run_contacts_no_server(embed_server, dead_server, classifier_file,
                                                     tmp_path, capsys):
    sample = write_sample(tmp_path / "S3.fasta", n=30, seed=11)
    out = tmp_path / "out"
    argv = ["--sample", str(sample), "--out", str(out), "--window", "16", "--progress", "plain"]
    offline = ["--resume", "--server", dead_server, "--retries", "0"]
    assert run_cli(*argv, "--server", embed_server.grpc_url,
                   "--metrics-url", embed_server.metrics_url) == cli.EXIT_OK
    capsys.readouterr()
    prep = json.loads((out / "summary.json").read_text())["stages"]["prep"]
    frames, chunks = prep["frames"], prep["chunks"]
    assert frames == len(expected_frames(sample)) and chunks >= 30
    before = snapshot(out)

    code = run_cli(*argv, *offline)
    captured = capsys.readouterr()
    assert code == cli.EXIT_OK, captured.err
    assert (f"resume: all {frames:,} frames / {chunks:,} chunks already embedded in {out}; "
            "nothing to do") in captured.out
    assert "missing" not in captured.err and dead_server not in captured.err, captured.err
    assert snapshot(out) == before  # not a byte, not an mtime changed

    # Derived files asked for now and not written by the finished run: made from the final
    # files, still without a server; the embeddings themselves are not touched.
    code = run_cli(*argv, *offline, "--merged", "--classifier", str(classifier_file))
    captured = capsys.readouterr()
    assert code == cli.EXIT_OK, captured.err
    assert (f"wrote the missing merged.parquet, {PREDICTIONS_FILE}, {HIGHEST_FILE}"
            in captured.out)
    after = snapshot(out)
    for name in ("dnabert_s.parquet", "esm2.parquet", "run.json", "manifest.jsonl"):
        assert after[name] == before[name], name
    _, ids, dna = read_model_table(out, "dnabert_s")
    _, esm_ids, esm = read_model_table(out, "esm2")
    _, merged_ids, merged = read_model_table(out, "merged")
    assert ids == esm_ids == merged_ids
    np.testing.assert_array_equal(merged, np.hstack([dna, esm]))
    predictions = (out / PREDICTIONS_FILE).read_text().splitlines()
    assert [row.split("\t")[0] for row in predictions[1:]] == ids
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["stages"]["write"]["merged"]["rows_final"] == frames
    assert summary["stages"]["classifier"]["frames"] == frames

    # Everything asked for is there now: nothing to do, nothing written.
    before = snapshot(out)
    code = run_cli(*argv, *offline, "--merged", "--classifier", str(classifier_file))
    assert code == cli.EXIT_OK
    assert "nothing to do" in capsys.readouterr().out
    assert snapshot(out) == before

    # A final file gone: the run is not complete any more and needs a server.
    (out / "esm2.parquet").unlink()
    code = run_cli(*argv, *offline)
    err = capsys.readouterr().err
    assert code == cli.EXIT_SERVER
    assert "esm2.parquet is missing" in err and "unavailable" in err


def test_resume_recomputes_only_what_is_missing(embed_server, dead_server, tmp_path, capsys,
                                                monkeypatch):
    sample = write_sample(tmp_path / "S4.fasta", n=30, seed=13)
    out = tmp_path / "out"
    argv = ["--sample", str(sample), "--out", str(out), "--window", "16", "--progress", "plain"]
    live = ["--server", embed_server.grpc_url, "--metrics-url", embed_server.metrics_url]

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    # Every block committed, then the final files fail: the parts stay, the run is resumable.
    monkeypatch.setattr(OutputDir, "finalize", full_disk)
    assert run_cli(*argv, *live) == cli.EXIT_OUTPUT
    monkeypatch.undo()
    capsys.readouterr()
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    blocks, frames = len(manifest), sum(r["frames"] for r in manifest)
    assert frames == len(expected_frames(sample)) and blocks >= 3

    # All parts there: finished from them, without a server.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    code = run_cli(*(["--out", str(copy)] + argv[4:] + argv[:2]), "--resume", "--server",
                   dead_server, "--retries", "0")
    captured = capsys.readouterr()
    assert code == cli.EXIT_OK, captured.err
    assert f"{blocks} of {blocks} committed blocks complete" in captured.err
    assert "no server was needed" in captured.err and "missing" not in captured.err
    assert_complete_output(copy, sample, embed_server.checkpoints, embed_server.hidden_sizes)
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["servers_detail"] == {}
    assert summary["resumed"]["blocks"] == blocks
    for model, sent in summary["stages"]["send"].items():
        assert sent["sequences_sent"] == 0 and sent["already_done"] == frames

    # One part deleted: without a server it says so and fails resumably ...
    victim = manifest[1]
    (out / "parts" / "esm2" / f"block-{victim['block']:08d}.parquet").unlink()
    code = run_cli(*argv, "--resume", "--server", dead_server, "--retries", "0")
    err = capsys.readouterr().err
    assert code == cli.EXIT_SERVER
    assert f"{blocks - 1} of {blocks} committed blocks complete" in err
    assert f"1 part missing (block {victim['block']}: esm2)" in err
    assert err.count("missing") == 1, err

    # ... and with one, only that part is computed: ESM-2 for that block's frames.
    code = run_cli(*argv, "--resume", *live)
    assert code == cli.EXIT_OK, capsys.readouterr().err
    assert_complete_output(out, sample, embed_server.checkpoints, embed_server.hidden_sizes)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["resumed"] == {"blocks": blocks - 1, "frames": frames - victim["frames"],
                                  "blocks_with_missing_parts": 1}
    send = summary["stages"]["send"]
    assert send["esm2"]["sequences_sent"] == send["esm2"]["sequences_received"] == victim["frames"]
    assert send["esm2"]["already_done"] == frames - victim["frames"]
    assert send["dnabert_s"]["sequences_sent"] == 0 and send["dnabert_s"]["already_done"] == frames
    for model in send:
        assert summary["stages"]["write"][model]["rows_final"] == frames
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == blocks + 1 and json.loads(lines[-1])["block"] == victim["block"]
    assert pq.ParquetFile(out / "esm2.parquet").metadata.num_rows == frames
