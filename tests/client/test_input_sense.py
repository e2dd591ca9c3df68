"""Input sense (issue 15, deliverable 3): RNA read as DNA and said so, a protein FASTA given to
--sample/--dna and a DNA FASTA given to --proteins refused with the right option named, '-'
reads standard input (spooled into --out)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embed_client import cli, inputs, reader, virnucpro
from embed_client.errors import InputError

from test_end_to_end import run_cli, write_sample


def live(embed_server) -> list:
    return ["--server", embed_server.grpc_url, "--metrics-url", embed_server.metrics_url]


def as_rna(dna: Path, rna: Path) -> Path:
    """The same sample with every T/t written U/u (headers kept)."""
    lines = dna.read_text().splitlines(keepends=True)
    rna.write_text("".join(l if l.startswith(">") else l.replace("T", "U").replace("t", "u")
                           for l in lines))
    return rna


def frames(path: Path):
    validated = reader.validate(path)
    return validated, list(virnucpro.prepare(
        ((r.id, r.sequence) for r in validated.records()), 300))


def test_rna_gives_the_frames_of_its_dna(tmp_path):
    dna = write_sample(tmp_path / "dna.fa", n=20, seed=3)
    rna = as_rna(dna, tmp_path / "rna.fa")
    v_dna, f_dna = frames(dna)
    v_rna, f_rna = frames(rna)
    assert v_dna.rna_records == 0 and v_rna.rna_records == 20
    assert len(f_dna) > 20 and f_rna == f_dna      # U codons read as T: same frames, same slices
    proteins = reader.validate(rna, alphabet=reader.Alphabet.of("ACDEFGHIKLMNPQRSTUVWY", "x"))
    assert proteins.rna_records == 0               # U in proteins is selenocysteine: kept


def test_rna_sample_is_embedded_as_its_dna_and_said(embed_server, tmp_path, capsys):
    dna = write_sample(tmp_path / "dna.fa", n=4, seed=5)
    rna = as_rna(dna, tmp_path / "rna.fa")
    for sample in (dna, rna):
        code = run_cli("--sample", str(sample), "--out", str(tmp_path / sample.stem),
                       *live(embed_server), "--merged")
        assert code == cli.EXIT_OK, capsys.readouterr().err
    err = capsys.readouterr().err
    assert f"{rna}: 4 of 4 records hold U (RNA): read as T" in err
    assert err.count("hold U (RNA)") == 1
    summaries = [json.loads((tmp_path / n / "summary.json").read_text()) for n in ("dna", "rna")]
    assert [s["stages"]["read"]["records_with_u_read_as_t"] for s in summaries] == [0, 4]
    a, b = (pq.read_table(tmp_path / n / "merged.parquet") for n in ("dna", "rna"))
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    np.testing.assert_allclose(np.stack(a.column("embedding").to_numpy(zero_copy_only=False)),
                               np.stack(b.column("embedding").to_numpy(zero_copy_only=False)),
                               rtol=1e-5, atol=1e-6)


PROTEINS = ">P1 a protein\nMKTAYIAKQRQISFVKSHFSRQ\n>P2\nMSTNPKPQRKTKRNTNRRPQDVKFPGG\n"


@pytest.mark.parametrize("option", ["--sample", "--dna"])
def test_a_protein_fasta_to_the_dna_paths_names_proteins(option, tmp_path, dead_server, capsys):
    fasta = tmp_path / "P.fasta"
    fasta.write_text(PROTEINS)
    code = run_cli(option, str(fasta), "--out", str(tmp_path / "out"), "--server", dead_server)
    assert code == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert "invalid letter 'I' at sequence position 6, an amino acid" in err
    assert "this looks like a protein FASTA: use --proteins" in err
    assert not (tmp_path / "out" / "run.json").exists()


def test_a_dna_fasta_to_proteins_names_dna_and_sample(tmp_path, dead_server, capsys):
    fasta = tmp_path / "D.fasta"
    fasta.write_text(">short\nACGT\n>d1\n" + "ACGTTGCAAN" * 3 + "\n>d2\n" + "acgu" * 8 + "\n")
    code = run_cli("--proteins", str(fasta), "--out", str(tmp_path / "out"),
                   "--server", dead_server)
    assert code == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert "this looks like a DNA FASTA" in err and "record 'd1'" in err
    assert "use --dna" in err and "--sample" in err
    # short records do not count, and one long record with another letter clears the file
    fasta.write_text(">a\nACGT\n>b\nACGTACGTACGTACGTACGTMK\n>c\n" + "ACGT" * 10 + "\n")
    inputs.refuse_dna(reader.validate(fasta, alphabet=reader.Alphabet.of("ACGTMKN", "x")))
    fasta.write_text(">a\nACGTAC\n>b\nGATTACA\n")
    inputs.refuse_dna(reader.validate(fasta))
    fasta.write_text(">a\n" + "ACGT" * 6 + "\n")
    with pytest.raises(InputError, match="first 1 record of >= 20 letters"):
        inputs.refuse_dna(reader.validate(fasta))


# ------------------------------------------------------------------ standard input

def stdin_of(monkeypatch, data: bytes) -> None:
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def test_stdin_needs_out(capsys):
    assert run_cli("--sample", "-") == cli.EXIT_USAGE
    assert "--sample - reads standard input: give --out DIR" in capsys.readouterr().err
    assert run_cli("--proteins", "-") == cli.EXIT_USAGE
    assert "--proteins - reads standard input" in capsys.readouterr().err


def test_stdin_is_spooled_and_resumed(embed_server, tmp_path, monkeypatch, capsys):
    import hashlib

    data = PROTEINS.encode()
    out = tmp_path / "out"
    argv = ["--proteins", "-", "--out", str(out), *live(embed_server)]
    stdin_of(monkeypatch, data)
    assert run_cli(*argv) == cli.EXIT_OK, capsys.readouterr().err
    assert (out / "stdin.input").read_bytes() == data
    run = json.loads((out / "run.json").read_text())
    assert run["sample"] == str((out / "stdin.input").resolve())
    assert run["sample_sha256"] == hashlib.sha256(data).hexdigest()
    assert pq.read_table(out / "esm2.parquet").column("id").to_pylist() == ["P1", "P2"]
    for again in (data, b""):                       # the same bytes, or nothing: the copy
        stdin_of(monkeypatch, again)
        assert run_cli(*argv, "--resume") == cli.EXIT_OK
        assert "all 2 sequences already embedded" in capsys.readouterr().out
    stdin_of(monkeypatch, data.replace(b"MKT", b"MKK"))
    assert run_cli(*argv, "--resume") == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "standard input (sha256" in err and "is not the first run's input" in err
    stdin_of(monkeypatch, b"")
    assert run_cli("--sample", "-", "--out", str(tmp_path / "o2")) == cli.EXIT_INPUT
    assert "standard input is empty" in capsys.readouterr().err


def test_the_console_script_reads_dna_from_stdin(embed_server, tmp_path):
    import shutil
    import subprocess
    import sys

    script = shutil.which("embed-client") or str(Path(sys.executable).with_name("embed-client"))
    out = tmp_path / "out"
    done = subprocess.run([script, "--dna", "-", "--out", str(out), *live(embed_server)],
                          input=b">d1\nACGTACGTTAGCCGAT\n>d2\nGAUUACA\n", capture_output=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    assert "1 of 2 records hold U (RNA): read as T" in done.stderr.decode()
    assert pq.read_table(out / "dnabert_s.parquet").column("id").to_pylist() == ["d1", "d2"]
