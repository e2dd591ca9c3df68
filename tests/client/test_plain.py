"""Plain mode (--proteins, --dna) and what to return (--include, --repr-layer, --with-sequence)
through embed-client and the session's real tritonserver (issue 15, deliverables 1 and 2).

References are independent of our code: transformers' EsmModel hidden states for ESM-2, a naive
float64 DNABERT-S forward written here (read from the checkpoint's safetensors by tensor name,
tokenized by the `tokenizers` library from its tokenizer.json) for DNABERT-S.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from embed_client import cli
from references import dnabert_reference_hidden

pytestmark = pytest.mark.server

PROTEINS = {"P1": "MKTAYIAKQRQISFVKSHFSRQ", "sp|P2|X_HUMAN": "ACDEFGHIKLMNPQRSTVWY",
            "p3": "mkl", "P4": "M", "P5": "MSTNPKPQRKTKRNTNRRPQDVKFPGG"}
DNA = {"d1": "ACGTACGTTAGCCGATNNACGT", "d2": "ttgacgatcgatcgggatcgatcgatcgatcgacgatcgat",
       "d3": "A", "d4": "GATTACA" * 9}


def write_fasta(path: Path, records: dict, width: int = 60) -> Path:
    with open(path, "w") as fh:
        for name, seq in records.items():
            fh.write(f">{name} some description\n")
            fh.writelines(seq[k:k + width] + "\n" for k in range(0, len(seq), width))
    return path


def run_cli(*argv: str) -> int:
    return cli.run(cli.build_parser().parse_args([*argv, "--progress", "plain"]))


def live(embed_server) -> list:
    return ["--server", embed_server.grpc_url, "--metrics-url", embed_server.metrics_url]


def per_token(out: Path, model: str) -> dict:
    """{id: rows} from the HDF5 file, read with h5py alone (the README's loader)."""
    with h5py.File(out / f"{model}.per_token.h5") as f:
        return {f[name].attrs["id"]: f[name][:] for name in f}


def assert_counts(out: Path, model: str, n: int) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete"
    send = summary["stages"]["send"][model]
    assert send["sequences_in"] == send["sequences_received"] + send["already_done"] == n
    assert summary["stages"]["write"][model]["rows_final"] == n
    return summary


# ------------------------------------------------------------------------------ ESM-2


@pytest.mark.parametrize("layer", [-1, 1])
def test_proteins_means_bos_and_per_token_equal_transformers(embed_server, tmp_path, layer):
    transformers = pytest.importorskip("transformers", reason="the independent ESM-2 reference")
    fasta = write_fasta(tmp_path / "P.fasta", PROTEINS)
    out = tmp_path / "out"
    code = run_cli("--proteins", str(fasta), "--out", str(out), *live(embed_server),
                   "--include", "mean,per_tok,bos", "--repr-layer", str(layer),
                   "--with-sequence", "--window", "2")
    assert code == cli.EXIT_OK, (out / "summary.json").read_text()
    table = pq.read_table(out / "esm2.parquet")
    assert table.column("id").to_pylist() == list(PROTEINS)          # record ids, input order
    assert table.column("sequence").to_pylist() == list(PROTEINS.values())
    assert table.column("length").to_pylist() == [len(s) for s in PROTEINS.values()]
    assert table.schema.metadata[b"layer"] == str(layer).encode()
    summary = assert_counts(out, "esm2", len(PROTEINS))
    assert summary["stages"]["write"]["esm2.per_token.h5"] == {"rows_final": len(PROTEINS)}
    assert not (out / "parts").exists()
    rows = per_token(out, "esm2")
    assert list(rows) == list(PROTEINS)

    path = embed_server.checkpoints / "esm2"
    model = transformers.EsmModel.from_pretrained(path, attn_implementation="eager").eval()
    tokenizer = transformers.EsmTokenizer.from_pretrained(path)
    means = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    bos = np.stack(table.column("bos").to_numpy(zero_copy_only=False))
    close = dict(rtol=1e-4, atol=1e-5)
    for i, (name, protein) in enumerate(PROTEINS.items()):
        ids = tokenizer(protein.upper(), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            states = model(ids, output_hidden_states=True).hidden_states[layer][0].numpy()
        assert rows[name].shape == (len(protein), embed_server.hidden_sizes["esm2"])
        np.testing.assert_allclose(rows[name], states[1:-1], **close)   # residues: no BOS/EOS
        np.testing.assert_allclose(means[i], states[1:-1].mean(0), **close)
        np.testing.assert_allclose(bos[i], states[0], **close)


# ------------------------------------------------------------------------------ DNABERT-S


def test_dna_per_token_and_means_equal_a_float64_reference(embed_server, tmp_path):
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    fasta = write_fasta(tmp_path / "D.fasta", DNA)
    out = tmp_path / "out"
    code = run_cli("--dna", str(fasta), "--out", str(out), *live(embed_server),
                   "--include", "per_token", "--window", "3")
    assert code == cli.EXIT_OK, (out / "summary.json").read_text()
    assert_counts(out, "dnabert_s", len(DNA))
    table = pq.read_table(out / "dnabert_s.parquet")
    assert table.column_names == ["id", "embedding", "length"]
    assert table.column("id").to_pylist() == list(DNA)
    means = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    rows = per_token(out, "dnabert_s")
    assert list(rows) == list(DNA)

    checkpoint = embed_server.checkpoints / "dnabert_s"
    cfg = SimpleNamespace(**json.loads((checkpoint / "config.json").read_text()))
    weights = checkpoint / "model.safetensors"
    state = (load_file(str(weights)) if weights.exists()
             else torch.load(checkpoint / "pytorch_model.bin", weights_only=True))
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    for i, (name, dna) in enumerate(DNA.items()):
        ids = tokenizer.encode(dna.upper()).ids
        if ids[0] != tokenizer.token_to_id("[CLS]"):           # a tokenizer without the template
            ids = [tokenizer.token_to_id("[CLS]"), *ids, tokenizer.token_to_id("[SEP]")]
        reference = dnabert_reference_hidden(state, cfg, ids).numpy()
        assert rows[name].shape == reference.shape              # every token, [CLS]/[SEP] in
        np.testing.assert_allclose(rows[name], reference, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(means[i], reference.mean(0), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ too long


def test_too_long_proteins_error_by_default_or_truncate(embed_server, tmp_path, capsys):
    rng = random.Random(1)
    long = "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(1100))
    fasta = write_fasta(tmp_path / "P.fasta", {"short": "MKL", "long": long, "head": long[:1022]})
    out = tmp_path / "out"
    assert run_cli("--proteins", str(fasta), "--out", str(out), *live(embed_server)) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert "'long'" in err and "1,100 residues" in err and "--too-long truncate" in err
    assert not (out / "run.json").exists()                      # nothing sent, nothing opened

    code = run_cli("--proteins", str(fasta), "--out", str(out), *live(embed_server),
                   "--too-long", "truncate")
    assert code == cli.EXIT_OK, capsys.readouterr().err
    summary = assert_counts(out, "esm2", 3)
    assert summary["plain"]["max_length"] == 1022
    assert summary["plain"]["too_long_records"] == [
        {"id": "long", "length": 1100, "action": "truncated", "sequences": 1, "kept": 1022}]
    assert (out / "too_long.tsv").read_text().splitlines()[1] == "long\t1100\ttruncated\t1\t1022"
    table = pq.read_table(out / "esm2.parquet")
    assert table.column("length").to_pylist() == [3, 1022, 1022]
    means = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(means[1], means[2], rtol=1e-5, atol=1e-6)   # fair-esm: first 1022

    assert run_cli("--proteins", str(fasta), "--out", str(tmp_path / "o2"), *live(embed_server),
                   "--too-long", "windows") == cli.EXIT_USAGE
    assert "--too-long windows: --proteins takes error, truncate" in capsys.readouterr().err


def test_too_long_dna_windows_with_offsets(embed_server, tmp_path):
    rng = random.Random(2)
    big = "".join(rng.choice("ACGT") for _ in range(10_300))
    fasta = write_fasta(tmp_path / "D.fasta", {"big": big, "tail": big[10_000:], "tiny": "ACGT"})
    out = tmp_path / "out"
    code = run_cli("--dna", str(fasta), "--out", str(out), *live(embed_server),
                   "--too-long", "windows", "--with-sequence")
    assert code == cli.EXIT_OK, (out / "summary.json").read_text()
    summary = assert_counts(out, "dnabert_s", 4)
    assert summary["stages"]["read"]["records_kept"] == 3
    assert summary["plain"]["too_long_records"] == [
        {"id": "big", "length": 10_300, "action": "windows", "sequences": 2, "kept": 10_300}]
    table = pq.read_table(out / "dnabert_s.parquet")
    assert table.column("id").to_pylist() == ["big_w0", "big_w10000", "tail", "tiny"]
    assert table.column("length").to_pylist() == [10_000, 300, 300, 4]
    assert "".join(table.column("sequence").to_pylist()[:2]) == big
    means = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(means[1], means[2], rtol=1e-5, atol=1e-6)   # offset 10,000


# ------------------------------------------------------------------------------ --resume


def test_resume_after_an_interruption_completes_without_recomputing(embed_server, tmp_path,
                                                                    disk_full_at_block, capsys):
    records = {f"prot{i}": "".join(random.Random(i).choice("ACDEFGHIKLMNPQRSTVWY")
                                   for _ in range(5 + 7 * i)) for i in range(9)}
    fasta = write_fasta(tmp_path / "P.fasta", records)
    out = tmp_path / "out"
    argv = ["--proteins", str(fasta), "--out", str(out), *live(embed_server),
            "--include", "mean,per_token", "--window", "3"]
    arm, disarm = disk_full_at_block
    arm(2)
    assert run_cli(*argv) == cli.EXIT_OUTPUT
    disarm()
    committed = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert 1 <= len(committed) < 3

    # Other options than the interrupted run's are refused, naming them.
    assert run_cli(*argv[:-4], "--include", "mean", "--resume") == cli.EXIT_USAGE
    assert run_cli(*argv, "--resume") == cli.EXIT_OK
    summary = assert_counts(out, "esm2", len(records))
    done = sum(r["frames"] for r in committed)
    assert summary["stages"]["send"]["esm2"]["already_done"] == done
    assert summary["stages"]["send"]["esm2"]["sequences_sent"] == len(records) - done
    rows = per_token(out, "esm2")
    assert list(rows) == list(records)
    assert [len(r) for r in rows.values()] == [len(s) for s in records.values()]
    means = np.stack(pq.read_table(out / "esm2.parquet").column("embedding")
                     .to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(means, np.stack([r.mean(0) for r in rows.values()]),
                               rtol=1e-5, atol=1e-6)

    # Finished: --resume says so; with its HDF5 file gone, the run is computed again.
    capsys.readouterr()
    assert run_cli(*argv, "--resume") == cli.EXIT_OK
    assert f"all {len(records)} sequences already embedded" in capsys.readouterr().out
    (out / "esm2.per_token.h5").unlink()
    assert run_cli(*argv, "--resume") == cli.EXIT_OK
    assert [len(r) for r in per_token(out, "esm2").values()] == [len(s) for s in records.values()]


# ------------------------------------------------------------------------------ --sample too


def test_sample_mode_returns_bos_per_token_rows_and_sequences(embed_server, tmp_path):
    from test_end_to_end import expected_frames, write_sample

    sample = write_sample(tmp_path / "S.fasta", n=5, seed=3)
    out = tmp_path / "out"
    code = run_cli("--sample", str(sample), "--out", str(out), *live(embed_server),
                   "--include", "bos,per_token", "--with-sequence", "--merged", "--window", "16")
    assert code == cli.EXIT_OK, (out / "summary.json").read_text()
    frames = expected_frames(sample)
    ids = [f.frame_id for f in frames]
    for model, field in (("dnabert_s", "nucleotide"), ("esm2", "protein")):
        assert_counts(out, model, len(frames))
        table = pq.read_table(out / f"{model}.parquet")
        assert table.column_names == ["id", "embedding", "length", "bos", "sequence"]
        assert table.column("id").to_pylist() == ids
        assert ([s.upper() for s in table.column("sequence").to_pylist()]
                == [getattr(f, field).upper() for f in frames])
        rows = per_token(out, model)
        assert list(rows) == ids
        means = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(means, np.stack([r.mean(0) for r in rows.values()]),
                                   rtol=1e-4, atol=1e-5)
    merged = pq.read_table(out / "merged.parquet")
    assert merged.column("id").to_pylist() == ids


def test_a_layer_the_model_has_not_is_refused_before_anything_is_sent(embed_server, tmp_path,
                                                                     capsys):
    fasta = write_fasta(tmp_path / "P.fasta", PROTEINS)
    out = tmp_path / "out"
    code = run_cli("--proteins", str(fasta), "--out", str(out), *live(embed_server),
                   "--repr-layer", "99")
    assert code == cli.EXIT_USAGE
    assert "refuses --include mean --repr-layer 99" in capsys.readouterr().err
    assert not (out / "run.json").exists()
