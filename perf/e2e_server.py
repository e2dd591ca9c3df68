"""perf/e2e.py's processes: embed-server under the stub's python, and embed-client runs against it."""
from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from e2e_common import MODELS, Failure, Scenario, log, tail
from e2e_setup import child_env, server_env, stub_python


class Server:
    """embed-server (embed_server.cli) in a subprocess, under the stub's python; stopped by SIGTERM."""

    def __init__(self, repo: Path, workdir: Path, out_dir: Path, cpu: bool, extra_path, gpus, timeout_s: float,
                 tag: str = ""):
        from embed_server.launcher import die_with_parent, free_ports
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.log_path = out_dir / f"e2e_tritonserver{tag}.log"         # tag: "" or "_<fp8 plan>", ...
        self.stdout_path = out_dir / f"e2e_embed_server{tag}.out"
        cmd = [stub_python(), "-m", "embed_server.cli", "--model-repository", str(repo),
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
               "--metrics-port", str(self.metrics_port), "--log-file", str(self.log_path),
               "--startup-timeout", str(timeout_s)]
        if cpu:
            cmd.append("--cpu")
        self.command = cmd
        self._out = open(self.stdout_path, "wb")
        self.process = subprocess.Popen(cmd, env=server_env(extra_path, gpus), stdin=subprocess.DEVNULL,
                                        stdout=self._out, stderr=subprocess.STDOUT, cwd=workdir,
                                        preexec_fn=die_with_parent)
        self.timeout_s = timeout_s

    def wait_ready(self) -> None:
        from embed_server.launcher import http_request
        deadline = time.monotonic() + self.timeout_s + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise Failure(f"embed-server exited with code {self.process.returncode} before it was ready:\n"
                              + tail(self.stdout_path, 25))
            status, _ = http_request(f"{self.http_url}/v2/health/ready", timeout=2)
            if status == 200 and "ready:" in self.stdout_path.read_text(errors="replace"):
                return
            time.sleep(0.5)
        raise Failure(f"embed-server not ready after {self.timeout_s:.0f} s:\n" + tail(self.log_path, 25))

    def stop(self) -> Optional[int]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._out.close()
        return self.process.returncode


def new_server(s: Scenario, repo: Path, tag: str, timeout_s: float) -> Server:
    """embed-server on `repo` as this run starts them (on the CPU with --small or without CUDA),
    not yet waited on."""
    return Server(repo, s.workdir, s.out_dir, cpu=s.args.small or s.device.type != "cuda",
                  extra_path=s.extra_path, gpus=s.args.gpus, timeout_s=timeout_s, tag=tag)


def start_server(s: Scenario, repo: Path, tag: str = "") -> Server:
    """The server phase: embed-server on `repo`, ready (on the CPU with --small or without CUDA).
    `tag` names its logs and phase ("" for the run's first server)."""
    t0 = time.monotonic()
    s.server = new_server(s, repo, tag, s.args.startup_timeout)
    s.server.wait_ready()
    s.phase(f"server_start{tag}", t0)
    log(f"server ready in {s.report['phases'][f'server_start{tag}']:.0f} s (log {s.server.log_path})")
    return s.server


def stop_server(s: Scenario, tag: str = "") -> None:
    """Stops the server (before the next one, or the baselines, which want the GPU to themselves)."""
    t0 = time.monotonic()
    s.server.stop()
    s.server = None
    s.phase(f"server_stop{tag}", t0)


def run_client(s: Scenario, sample: Path, models: tuple = MODELS, tag: str = "client") -> tuple:
    """(exit code, summary dict or {}, seconds, output dir): embed-client as a subprocess, its log in
    out_dir/e2e_<tag>.log."""
    from embed_server.launcher import die_with_parent
    args, server = s.args, s.server
    client_out = s.workdir / f"{tag}_out"
    cmd = [sys.executable, "-m", "embed_client.cli", "--sample", str(sample), "--server", server.grpc_url,
           "--metrics-url", server.metrics_url, "--out", str(client_out), "--chunk", str(args.chunk),
           "--models", ",".join(models), "--progress", "plain", "--log-interval", "15"] + list(args.client_arg)
    log_path = s.out_dir / f"e2e_{tag}.log"
    t0 = time.perf_counter()
    with open(log_path, "wb") as fh:
        fh.write((" ".join(cmd) + "\n").encode())
        fh.flush()
        code = subprocess.run(cmd, env=child_env(s.extra_path), stdin=subprocess.DEVNULL, stdout=fh,
                              stderr=subprocess.STDOUT, preexec_fn=die_with_parent).returncode
    seconds = time.perf_counter() - t0
    summary = {}
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads((client_out / "summary.json").read_text())
    return code, summary, seconds, client_out


def client_counts(summary: dict, model: str) -> dict:
    """The client's own counts for one model: frames it read and sent, embeddings it wrote."""
    stages = summary.get("stages", {})
    return {"client_in": stages.get("send", {}).get(model, {}).get("sequences_in"),
            "client_out": stages.get("write", {}).get(model, {}).get("rows_final")}


def first_rows(parquet: Path, n: int):
    """The first n embeddings of a client Parquet file, [n, hidden] float32 (rows in frame order)."""
    import numpy as np
    import pyarrow.parquet as pq
    batch = next(pq.ParquetFile(str(parquet)).iter_batches(batch_size=n, columns=["embedding"]))
    column = batch.column(0)
    return np.asarray(column.values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(column), -1)
