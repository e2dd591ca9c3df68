"""workflow/ (Snakemake): lint and dry-run pass; two tiny samples (subsets of the bundled demo
FASTA) run through embed-client against the session's real tritonserver, and the gathered
table holds each sample's counts. The first attempt fails (every request times out) after the
clients opened their output directories; the next `snakemake` call continues both samples with
`embed-client --resume`; a finished workflow does nothing again.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "workflow"
SNAKEFILE = WORKFLOW / "Snakefile"
DEMO = ROOT / "client" / "data" / "demo.fasta"
SAMPLES = {"alpha": (0, 4), "beta": (4, 11)}   # record ranges of demo.fasta


def snakemake_bin() -> str:
    pytest.importorskip("snakemake", reason="snakemake (the workflow extra, Python >= 3.11) is needed")
    path = Path(sys.executable).parent / "snakemake"
    return str(path) if path.exists() else shutil.which("snakemake")


def snakemake(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    return subprocess.run([snakemake_bin(), "--snakefile", str(SNAKEFILE), "--directory", str(cwd), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def fasta_records(path: Path) -> list:
    records, current = [], None
    for line in path.read_text().splitlines():
        if line.startswith(">"):
            current = [line]
            records.append(current)
        elif current is not None:
            current.append(line)
    return records


def test_lint(tmp_path):
    result = snakemake("--lint", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dry_run_with_the_local_profile(tmp_path):
    """The bundled config and sample sheet, through the local profile (the rotation test below
    dry-runs a given config without a profile)."""
    result = snakemake("--dry-run", "--profile", str(WORKFLOW / "profiles" / "local"), cwd=tmp_path, timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "embed" in out and "gather" in out   # the bundled sample sheet's demo sample


def test_samples_list_the_servers_from_different_ones(tmp_path):
    """Dry-run shell commands: sample k starts its --server list k * server_stride further on."""
    servers = [f"10.0.0.{i}:8001" for i in range(12)]
    (tmp_path / "samples.tsv").write_text("sample\tpath\n" + "".join(f"s{i}\t{DEMO}\n" for i in range(3)))
    (tmp_path / "c.json").write_text(json.dumps({"samples": str(tmp_path / "samples.tsv"), "servers": servers,
                                                  "server_stride": 5}))
    result = snakemake("--configfile", str(tmp_path / "c.json"), "--dry-run", "--printshellcmds", "--cores", "1",
                       cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    firsts = {}
    for line in result.stdout.splitlines():
        if "--sample" in line and "--server" in line:
            sample = line.split("--out ")[1].split()[0].rsplit("/", 1)[-1]
            listed = line.split("--server ")[1:]
            firsts[sample] = [s.split()[0] for s in listed]
    assert {s: l[0] for s, l in firsts.items()} == {"s0": servers[0], "s1": servers[5], "s2": servers[10]}
    assert all(sorted(l) == sorted(servers) for l in firsts.values())


def test_profiles_use_known_options():
    """Every generic key of the profiles is a snakemake option; executor keys name their plugin."""
    yaml = pytest.importorskip("yaml")
    help_text = subprocess.run([snakemake_bin(), "--help"], capture_output=True, text=True, timeout=120).stdout
    for profile in ("local", "slurm", "kubernetes"):
        config = yaml.safe_load((WORKFLOW / "profiles" / profile / "config.yaml").read_text())
        for key in config:
            if key.startswith(("slurm-", "kubernetes-")):
                assert config.get("executor") == key.split("-")[0], (profile, key)
                continue
            assert f"--{key}" in help_text, f"{profile}: snakemake has no --{key}"
        assert config["resources"]["embed_clients"] >= 1
    assert yaml.safe_load((WORKFLOW / "profiles" / "slurm" / "config.yaml").read_text())["executor"] == "slurm"
    assert yaml.safe_load((WORKFLOW / "profiles" / "kubernetes" / "config.yaml").read_text())["executor"] == "kubernetes"


@pytest.mark.server
def test_two_samples_against_the_real_server(tmp_path, embed_server):
    records = fasta_records(DEMO)
    sheet = ["sample\tpath"]
    for name, (first, last) in SAMPLES.items():
        path = tmp_path / "input" / f"{name}.fasta"
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join(line for record in records[first:last] for line in record) + "\n")
        sheet.append(f"{name}\tinput/{name}.fasta")       # relative: from the working directory
    (tmp_path / "samples.tsv").write_text("\n".join(sheet) + "\n")
    client = Path(sys.executable).parent / "embed-client"
    config = {"samples": str(tmp_path / "samples.tsv"), "servers": [embed_server.grpc_url],
              "results": "results", "client": str(client) if client.exists() else "embed-client",
              "client_args": ["--timeout", "120"], "retries": 0}
    (tmp_path / "run.json").write_text(json.dumps(config))   # JSON is YAML
    # A first attempt whose requests all time out: each client opens its output directory,
    # then gives the server up (exit 4); Snakemake removes the failed jobs' summary.json.
    failing = dict(config, client_args=["--timeout", "0.001", "--retries", "0"])
    (tmp_path / "failing.json").write_text(json.dumps(failing))
    results = tmp_path / "results"

    def logs():
        return "\n".join(f"== {p.name}\n{p.read_text()}" for p in sorted((results / "logs").glob("*.log"))) \
            if (results / "logs").exists() else ""

    first = snakemake("--configfile", str(tmp_path / "failing.json"), "--cores", "2", "--keep-going", cwd=tmp_path)
    assert first.returncode != 0, logs()
    for name in SAMPLES:
        assert (results / name / "run.json").exists(), logs()          # a run to resume
        assert not (results / name / "summary.json").exists()

    # The workflow again, servers answering: both samples continue with --resume.
    result = snakemake("--configfile", str(tmp_path / "run.json"), "--cores", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + logs()[-3000:]
    for name in SAMPLES:
        assert "resume: " in (results / "logs" / f"{name}.embed.log").read_text(), logs()   # the --resume path

    table = results / "samples_summary.tsv"
    with open(table, newline="") as fh:
        rows = {r["sample"]: r for r in csv.DictReader(fh, delimiter="\t")}
    assert list(rows) == sorted(SAMPLES)
    for name, (first_record, last_record) in SAMPLES.items():
        row = rows[name]
        summary = json.loads((results / name / "summary.json").read_text())
        assert row["status"] == "complete"
        assert int(row["records_in_file"]) == int(row["records_kept"]) == last_record - first_record
        frames = int(row["frames"])
        assert frames > 0 and frames == summary["stages"]["prep"]["frames"]
        assert int(row["esm2_rows"]) == int(row["dnabert_s_rows"]) == frames   # every frame, both models
        assert int(row["rejected"]) == 0

    # Finished: nothing to do again.
    again = snakemake("--configfile", str(tmp_path / "run.json"), "--cores", "2", cwd=tmp_path)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
