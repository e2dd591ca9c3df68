"""A verifiable run (issue 14): the sample is known by its content, parts by their checksums.

- `--resume` with another sample of the same byte size (R1/R2 of one run) is refused, for a
  finished run and for an unfinished one, naming both files and fingerprints.
- 64 zeroed bytes in one committed ESM-2 part: `--resume` says the part is corrupted,
  recomputes it (that model, that block only), and the final rows equal a clean run's.
- A part corrupted after it was committed, before the final files: no final or derived file
  is written, the run says why, and `--resume` recomputes it.
- A finished run's files against checksums.sha256 (`sha256sum -c` agrees): a changed
  merged.parquet is written again by `--resume --merged`, a changed esm2.parquet makes the
  run compute again (it needs a server then), ending with the clean run's rows.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from embed_client import cli
from embed_client.integrity import CHECKSUMS_FILE, file_sha256, read_checksums
from embed_client.sink import OutputDir, RunConfig

from test_end_to_end import (assert_complete_output, classifier_file, read_model_table,  # noqa: F401
                             run_cli, write_sample)

pytestmark = pytest.mark.server


def same_size_other_sample(sample: Path, other: Path) -> Path:
    """`sample` with one base changed: the same byte size, another content."""
    lines = sample.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        if not line.startswith(">") and "A" in line:
            lines[i] = line.replace("A", "C", 1)
            break
    other.write_text("".join(lines))
    assert other.stat().st_size == sample.stat().st_size
    return other


def manifest(out: Path) -> list:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def full_disk(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_same_size_different_sample_is_refused(embed_server, tmp_path, capsys, monkeypatch):
    r1 = write_sample(tmp_path / "R1.fasta", n=12, seed=21)
    r2 = same_size_other_sample(r1, tmp_path / "R2.fasta")
    live = ["--server", embed_server.grpc_url, "--metrics-url", embed_server.metrics_url,
            "--window", "16", "--progress", "plain"]
    finished, unfinished = tmp_path / "finished", tmp_path / "unfinished"
    assert run_cli("--sample", str(r1), "--out", str(finished), *live) == cli.EXIT_OK
    monkeypatch.setattr(OutputDir, "finalize", full_disk)
    assert run_cli("--sample", str(r1), "--out", str(unfinished), *live) == cli.EXIT_OUTPUT
    monkeypatch.undo()
    run = json.loads((finished / "run.json").read_text())
    assert run["sample_sha256"] == file_sha256(r1)
    capsys.readouterr()

    for out in (finished, unfinished):
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        code = run_cli("--sample", str(r2), "--out", str(out), "--resume", *live)
        err = capsys.readouterr().err
        assert code == cli.EXIT_USAGE, err
        assert "Traceback" not in err
        assert "a different sample" in err and str(r1) in err and str(r2) in err, err
        assert file_sha256(r1)[:16] in err and file_sha256(r2)[:16] in err, err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # The right sample still resumes the unfinished run (from its parts, no recomputing).
    assert run_cli("--sample", str(r1), "--out", str(unfinished), "--resume", *live) == cli.EXIT_OK
    summary = json.loads((unfinished / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["resumed"]["blocks"] == len(manifest(unfinished))


def test_run_json_without_a_fingerprint_is_checked_by_size():
    old = RunConfig("a.fasta", 100, 300, ("esm2",), 16, False)
    assert old.mismatches(RunConfig("a.fasta", 100, 300, ("esm2",), 16, False, sample_sha256="ab")) == []
    assert "sample size" in old.mismatches(RunConfig("a.fasta", 101, 300, ("esm2",), 16, False))[0]
    new = RunConfig("R1.fq", 100, 300, ("esm2",), 16, False, sample_sha256="1" * 64)
    problems = new.mismatches(RunConfig("R2.fq", 100, 300, ("esm2",), 16, False, sample_sha256="2" * 64))
    assert len(problems) == 1 and "R1.fq" in problems[0] and "R2.fq" in problems[0]


def zero_64_bytes(part: Path) -> None:
    data = bytearray(part.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)
    part.write_bytes(bytes(data))


def test_zeroed_bytes_in_a_part_are_detected_and_recomputed(embed_server, tmp_path, capsys,
                                                           monkeypatch):
    sample = write_sample(tmp_path / "S.fasta", n=30, seed=23)
    live = ["--sample", str(sample), "--window", "16", "--progress", "plain",
            "--server", embed_server.grpc_url, "--metrics-url", embed_server.metrics_url]
    clean, out = tmp_path / "clean", tmp_path / "out"
    assert run_cli(*live, "--out", str(clean)) == cli.EXIT_OK
    monkeypatch.setattr(OutputDir, "finalize", full_disk)
    assert run_cli(*live, "--out", str(out)) == cli.EXIT_OUTPUT
    monkeypatch.undo()
    blocks = manifest(out)
    assert len(blocks) >= 3 and all(set(b["sha256"]) == {"dnabert_s", "esm2"} for b in blocks)
    victim = blocks[1]
    part = out / "parts" / "esm2" / f"block-{victim['block']:08d}.parquet"
    assert file_sha256(part) == victim["sha256"]["esm2"]
    zero_64_bytes(part)
    capsys.readouterr()

    assert run_cli(*live, "--out", str(out), "--resume") == cli.EXIT_OK
    err = capsys.readouterr().err
    assert f"block {victim['block']}: the esm2 part" in err and "corrupted" in err, err
    assert f"1 part corrupted (block {victim['block']}: esm2)" in err, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["resumed"]["blocks_with_missing_parts"] == 1
    send = summary["stages"]["send"]
    assert send["esm2"]["sequences_sent"] == victim["frames"]
    assert send["dnabert_s"]["sequences_sent"] == 0
    for model in ("esm2", "dnabert_s"):
        _, ids, got = read_model_table(out, model)
        _, clean_ids, expected = read_model_table(clean, model)
        assert ids == clean_ids
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=model)
    assert_complete_output(out, sample, embed_server.checkpoints, embed_server.hidden_sizes)


def test_part_corrupted_before_the_final_files_stops_them(embed_server, classifier_file,
                                                          tmp_path, capsys, monkeypatch):
    sample = write_sample(tmp_path / "S.fasta", n=20, seed=29)
    out = tmp_path / "out"
    argv = ["--sample", str(sample), "--out", str(out), "--window", "16", "--progress", "plain",
            "--server", embed_server.grpc_url, "--metrics-url", embed_server.metrics_url,
            "--merged", "--classifier", str(classifier_file)]
    finalize = OutputDir.finalize

    def corrupt_then_finalize(self, *args, **kwargs):
        last = max(self.blocks)
        zero_64_bytes(self.part_path("dnabert_s", last))
        return finalize(self, *args, **kwargs)

    monkeypatch.setattr(OutputDir, "finalize", corrupt_then_finalize)
    assert run_cli(*argv) == cli.EXIT_OUTPUT
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "is corrupted" in err and "--resume" in err and "Traceback" not in err, err
    finals = ("dnabert_s.parquet", "esm2.parquet", "merged.parquet", "prediction_results.txt")
    assert not any((out / name).exists() for name in finals)
    assert not list(out.glob("*.partial"))
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"

    assert run_cli(*argv, "--resume") == cli.EXIT_OK
    err = capsys.readouterr().err
    assert "1 part corrupted" in err, err
    assert_complete_output(out, sample, embed_server.checkpoints, embed_server.hidden_sizes)


def test_finished_run_files_are_checked(embed_server, dead_server, tmp_path, capsys):
    sample = write_sample(tmp_path / "S.fasta", n=12, seed=43)
    out = tmp_path / "out"
    argv = ["--sample", str(sample), "--out", str(out), "--window", "16", "--progress", "plain",
            "--merged"]
    live = ["--server", embed_server.grpc_url, "--metrics-url", embed_server.metrics_url]
    offline = ["--resume", "--server", dead_server, "--retries", "0"]
    assert run_cli(*argv, *live) == cli.EXIT_OK
    recorded = read_checksums(out)
    assert set(recorded) == {"dnabert_s.parquet", "esm2.parquet", "merged.parquet"}
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "--quiet", "-c", CHECKSUMS_FILE], cwd=out, check=True)
    clean = {m: read_model_table(out, m)[2].copy() for m in ("esm2", "dnabert_s", "merged")}
    capsys.readouterr()

    zero_64_bytes(out / "merged.parquet")
    code = run_cli(*argv, *offline)
    captured = capsys.readouterr()
    assert code == cli.EXIT_OK, captured.err
    assert "merged.parquet changed since the run wrote it" in captured.err
    assert "wrote the missing merged.parquet" in captured.out
    np.testing.assert_array_equal(read_model_table(out, "merged")[2], clean["merged"])
    rewritten = read_checksums(out)
    assert rewritten["merged.parquet"] == file_sha256(out / "merged.parquet")
    assert {k: v for k, v in rewritten.items() if k != "merged.parquet"} == {
        k: v for k, v in recorded.items() if k != "merged.parquet"}

    zero_64_bytes(out / "esm2.parquet")
    code = run_cli(*argv, *offline)
    err = capsys.readouterr().err
    assert code == cli.EXIT_SERVER, err
    assert "esm2.parquet changed since the run wrote it" in err and "recomputing" in err, err
    assert run_cli(*argv, "--resume", *live) == cli.EXIT_OK
    for model, expected in clean.items():
        np.testing.assert_allclose(read_model_table(out, model)[2], expected, atol=1e-5, rtol=0)
    assert "nothing to do" in (capsys.readouterr(), run_cli(*argv, *offline),
                               capsys.readouterr().out)[2]
