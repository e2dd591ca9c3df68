"""embed-client's command line: help, usage errors, bad inputs and their exit codes.

Bad inputs are caught before any server is contacted, so those tests point --server at a
port where nothing listens: nothing is sent, and nothing partial is left behind.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from embed_client import cli

from test_end_to_end import run_cli, write_sample


def test_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for action in cli.build_parser()._actions:
        if action.dest == "help":
            continue
        assert any(opt in text for opt in action.option_strings), action.dest
        assert action.help, action.dest
    for option in ("--chunk {300,500}", "--token-budget", "--max-in-flight", "--window",
                   "--retries", "--timeout", "--models", "--skip-bad-records", "--resume",
                   "--metrics-url", "--classifier", "--allow-pickle", "--merged", "--out"):
        assert option in text
    assert "(default: 300)" in text and "(default: esm2,dnabert_s)" in text
    assert "(default: localhost:8001)" in text and "(default: 65536)" in text
    for code in (cli.EXIT_INPUT, cli.EXIT_SERVER, cli.EXIT_INCOMPLETE, cli.EXIT_USAGE):
        assert f" {code} " in text  # every exit code is documented in the epilog


@pytest.mark.parametrize("argv", [
    ["--chunk", "400"],
    ["--models", "esm2,foo"],
    ["--token-budget", "0"],
    ["--retries", "-1"],
])
def test_bad_option_values_are_usage_errors(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--sample", str(tmp_path / "x.fa")] + argv)
    assert exit_info.value.code == cli.EXIT_USAGE
    assert "error:" in capsys.readouterr().err


def test_merged_needs_both_models(tmp_path, dead_server, capsys):
    sample = write_sample(tmp_path / "s.fa", n=3)
    code = run_cli("--sample", str(sample), "--server", dead_server, "--models", "esm2",
                   "--merged")
    assert code == cli.EXIT_USAGE
    assert "need both models" in capsys.readouterr().err


def _gzip_truncated(path: Path) -> None:
    data = gzip.compress(b"".join(b">r%d\n%s\n" % (i, b"ACGT" * 200) for i in range(200)))
    path.write_bytes(data[: len(data) // 2])


BAD_INPUTS = {
    "duplicate_ids": (lambda p: p.write_text(">a\nACGT\n>b\nACGG\n>a\nTTTT\n"),
                      ["duplicate record id", "'a'", ":5"]),
    "empty_record": (lambda p: p.write_text(">a\nACGT\n>empty\n>c\nACGT\n"),
                     ["empty sequence", "'empty'"]),
    "non_iupac": (lambda p: p.write_text(">a\nACGT\n>b\nACGTXACGT\n"),
                  ["invalid letter 'X'", "'b'", "position 5"]),
    "not_fasta": (lambda p: p.write_text("sequence,label\nACGT,1\n"),
                  ["not a FASTA or FASTQ file"]),
    "truncated_gzip": (_gzip_truncated, ["truncated or corrupt"]),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_exit_code_and_message(kind, tmp_path, dead_server, capsys):
    write, expected = BAD_INPUTS[kind]
    sample = tmp_path / ("S1.fa.gz" if kind == "truncated_gzip" else "S1.fa")
    write(sample)
    out = tmp_path / "out"
    code = run_cli("--sample", str(sample), "--out", str(out), "--server", dead_server,
                   "--retries", "0")
    err = capsys.readouterr().err
    assert code == cli.EXIT_INPUT, err
    assert "bad input" in err
    for text in expected:
        assert text in err
    assert not out.exists()  # nothing sent, nothing that looks like a result


def test_unreachable_server_exit_code(tmp_path, dead_server, capsys):
    sample = write_sample(tmp_path / "S1.fa", n=3)
    out = tmp_path / "out"
    code = run_cli("--sample", str(sample), "--out", str(out), "--server", dead_server,
                   "--retries", "0")
    assert code == cli.EXIT_SERVER
    assert "unavailable" in capsys.readouterr().err
    assert not (out / "summary.json").exists()


def test_output_directory_rules(tmp_path, dead_server, capsys):
    """Checked before any server is contacted: a non-empty --out, or --resume with no run."""
    sample = write_sample(tmp_path / "S1.fa", n=3)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something.txt").write_text("mine")
    code = run_cli("--sample", str(sample), "--out", str(busy), "--server", dead_server)
    assert code == cli.EXIT_USAGE
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in busy.iterdir()] == ["something.txt"]
    code = run_cli("--sample", str(sample), "--out", str(tmp_path / "new"), "--server",
                   dead_server, "--resume")
    assert code == cli.EXIT_USAGE
    assert "no interrupted run" in capsys.readouterr().err


@pytest.mark.server
def test_skip_bad_records_reports_what_it_skipped(tmp_path, embed_server, capsys):
    sample = tmp_path / "mixed.fasta"
    sample.write_text(">ok1\nATGAAACCCGGGTTTAAAGGG\n>bad\nACGT1ACGT\n>ok2\nATGGCCATTGTAATGGGCCGC\n"
                      ">ok1\nACGTACGT\n>empty\n")
    out = tmp_path / "out"
    code = run_cli("--sample", str(sample), "--out", str(out), "--server", embed_server.grpc_url,
                   "--metrics-url", embed_server.metrics_url, "--skip-bad-records")
    assert code == cli.EXIT_OK, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    read = summary["stages"]["read"]
    assert (read["records_in_file"], read["records_kept"], read["records_skipped"]) == (5, 2, 3)
    skipped = (out / "skipped.tsv").read_text().splitlines()
    assert len(skipped) == 4 and all(f"\t{r}\t" in "\n".join(skipped) for r in ("bad", "ok1", "empty"))
    ids = pq.read_table(out / "esm2.parquet").column("id").to_pylist()
    assert ids and {i.rsplit("_chunk_", 1)[0] for i in ids} <= {"ok1", "ok2"}
    assert summary["stages"]["send"]["esm2"]["sequences_in"] == len(ids)


@pytest.mark.server
def test_classifier_of_the_wrong_width_stops_before_sending(tmp_path, embed_server, capsys):
    import numpy as np

    sample = write_sample(tmp_path / "S1.fa", n=3)
    rng = np.random.default_rng(0)
    state = {"hidden_layer.weight": rng.normal(size=(512, 3328)), "hidden_layer.bias": np.zeros(512),
             "bn1.weight": np.ones(512), "bn1.bias": np.zeros(512),
             "bn1.running_mean": np.zeros(512), "bn1.running_var": np.ones(512),
             "output_layer.weight": rng.normal(size=(2, 512)), "output_layer.bias": np.zeros(2)}
    weights = tmp_path / "300_model.npz"
    np.savez(weights, **{k: v.astype(np.float32) for k, v in state.items()})
    out = tmp_path / "out"
    code = run_cli("--sample", str(sample), "--out", str(out), "--server", embed_server.grpc_url,
                   "--classifier", str(weights))
    assert code == cli.EXIT_USAGE
    width = sum(embed_server.hidden_sizes.values())
    assert f"takes 3328 features, but the servers' models give {width}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("server, metrics, expected", [
    ("localhost:8001", None, ("localhost:8001", "http://localhost:8002/metrics")),
    ("gpu-node-3", None, ("gpu-node-3:8001", "http://gpu-node-3:8002/metrics")),
    ("grpc://10.0.0.5:9001/", None, ("10.0.0.5:9001", "http://10.0.0.5:9002/metrics")),
    ("[::1]:8001", None, ("[::1]:8001", "http://[::1]:8002/metrics")),
    ("h:8001", "h:9102", ("h:8001", "http://h:9102/metrics")),
    ("h:8001", "https://m.example/custom", ("h:8001", "https://m.example/custom")),
])
def test_server_and_metrics_urls(server, metrics, expected):
    from embed_client.transport import ServerSpec

    spec = ServerSpec.parse(server, metrics)
    assert (spec.url, spec.metrics_url) == expected


def test_metrics_urls_pair_with_servers_in_order(tmp_path):
    args = cli.build_parser().parse_args([
        "--sample", str(tmp_path / "S1.fq.gz"), "--server", "a:1", "--server", "b:2",
        "--metrics-url", "a:3"])
    options = cli.options_from_args(args)
    assert [(s.url, s.metrics_url) for s in options.servers] == [
        ("a:1", "http://a:3/metrics"), ("b:2", "http://b:3/metrics")]
    assert options.out == tmp_path / "S1_embeddings"  # default: beside the sample
    assert options.models == ("dnabert_s", "esm2") and options.chunk == 300


@pytest.mark.server
def test_a_full_disk_while_committing_is_a_clear_error_and_resumable(tmp_path, embed_server,
                                                                     capsys, monkeypatch):
    import errno

    from embed_client.sink import OutputDir

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(OutputDir, "commit", full_disk)
    sample = write_sample(tmp_path / "S1.fa", n=3)
    out = tmp_path / "out"
    code = run_cli("--sample", str(sample), "--out", str(out), "--server", embed_server.grpc_url,
                   "--metrics-url", embed_server.metrics_url)
    error = capsys.readouterr().err.split("embed-client: error: ")[-1]
    assert code == cli.EXIT_OUTPUT  # returned, not raised: a message, no traceback
    assert "No space left on device" in error and "--resume" in error
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["resumable"]
    monkeypatch.undo()
    code = run_cli("--sample", str(sample), "--out", str(out), "--server", embed_server.grpc_url,
                   "--metrics-url", embed_server.metrics_url, "--resume")
    assert code == cli.EXIT_OK, capsys.readouterr().err
