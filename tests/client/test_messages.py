"""What embed-client says when a run cannot go as asked (issue 14, deliverable 5).

- An output directory that cannot be written (a file in the way, a read-only folder): a clear
  error, exit EXIT_OUTPUT, no traceback, no server contacted, no --resume hint.
- The "--resume" hint only when the output directory holds a run to resume.
- Servers that answer nothing for --silence-warning seconds while sequences wait: a warning.
- A sample that gives 0 frames (every frame has a stop codon): a warning, also in summary.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from embed_client import cli
from embed_client.transport import Server

from test_end_to_end import run_cli, write_sample

pytestmark = pytest.mark.server

# Stop codons in all six frames: TAA at offsets 0, 4, 8 (forward), TTA likewise (reverse).
ALL_STOPS = "TAACTAACTAATTAGTTAGTTA"


def offline(sample: Path, out: Path, dead_server: str):
    return ["--sample", str(sample), "--out", str(out), "--server", dead_server,
            "--retries", "0", "--progress", "plain"]


def assert_unwritable(code: int, err: str, resume: bool = False) -> None:
    assert code == cli.EXIT_OUTPUT, err
    assert "cannot be written" in err and "Traceback" not in err, err
    assert ("--resume" in err) == resume, err
    assert "unavailable" not in err, err  # refused before any server is contacted


def test_output_in_the_way_of_a_file(dead_server, tmp_path, capsys):
    sample = write_sample(tmp_path / "S.fasta", n=2)
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    code = run_cli(*offline(sample, blocker / "out", dead_server))
    err = capsys.readouterr().err
    assert_unwritable(code, err)
    assert f"{blocker} is not a directory" in err


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` made unwritable for a while: chmod for a user, the immutable attribute for root."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)],
                                        capture_output=True).returncode != 0:
        pytest.skip("running as root where the immutable attribute cannot be set")
    try:
        yield folder
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)


def test_read_only_output(dead_server, tmp_path, capsys):
    sample = write_sample(tmp_path / "S.fasta", n=2)
    folder = tmp_path / "read_only"
    folder.mkdir()
    with read_only(folder):
        for out in (folder, folder / "new" / "out"):
            code = run_cli(*offline(sample, out, dead_server))
            err = capsys.readouterr().err
            assert_unwritable(code, err)
            assert f"{folder} is not writable" in err or "(is not writable)" in err, err
        assert not any(folder.iterdir())


def test_read_only_run_to_resume(dead_server, tmp_path, capsys):
    sample = write_sample(tmp_path / "S.fasta", n=2)
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    with read_only(out):
        code = run_cli(*offline(sample, out, dead_server), "--resume")
        err = capsys.readouterr().err
        assert_unwritable(code, err, resume=True)
        assert "fix its permissions, then continue with --resume" in err


def test_resume_hint_only_with_a_run_to_resume(dead_server, tmp_path, capsys):
    sample = write_sample(tmp_path / "S.fasta", n=2)
    out = tmp_path / "never_started"
    code = run_cli(*offline(sample, out, dead_server))
    err = capsys.readouterr().err
    assert code == cli.EXIT_SERVER and "unavailable" in err, err
    assert "--resume" not in err and not out.exists(), err


def test_silent_servers_are_reported(embed_server, tmp_path, capsys, monkeypatch):
    sample = write_sample(tmp_path / "S.fasta", n=4, seed=41)
    embed = Server.embed
    frozen_until = []

    async def frozen_for_a_while(self, *args, **kwargs):
        """Every answer waits until 3 s after the first request: a server stopped, then resumed."""
        if not frozen_until:
            frozen_until.append(time.monotonic() + 3.0)
        await asyncio.sleep(max(0.0, frozen_until[0] - time.monotonic()))
        return await embed(self, *args, **kwargs)

    monkeypatch.setattr(Server, "embed", frozen_for_a_while)
    code = run_cli("--sample", str(sample), "--out", str(tmp_path / "out"), "--window", "16",
                   "--server", embed_server.grpc_url, "--metrics-url", embed_server.metrics_url,
                   "--progress", "plain", "--silence-warning", "1")
    err = capsys.readouterr().err
    assert code == cli.EXIT_OK, err
    assert "no answer from any server for" in err and embed_server.grpc_url in err, err
    assert "--timeout" in err

    code = run_cli("--sample", str(sample), "--out", str(tmp_path / "bad"),
                   "--server", embed_server.grpc_url, "--silence-warning", "-1")
    assert code == cli.EXIT_USAGE


def test_sample_without_frames_warns(embed_server, tmp_path, capsys):
    sample = tmp_path / "stops.fasta"
    sample.write_text(f">r1\n{ALL_STOPS}\n>r2\n{ALL_STOPS * 3}\n")
    out = tmp_path / "out"
    code = run_cli("--sample", str(sample), "--out", str(out), "--server", embed_server.grpc_url,
                   "--metrics-url", embed_server.metrics_url, "--progress", "plain")
    captured = capsys.readouterr()
    assert code == cli.EXIT_OK, captured.err
    assert "0 frames to embed: 2 records" in captured.err, captured.err
    assert "12 frames dropped for a stop codon" in captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and "0 frames" in summary["message"]
