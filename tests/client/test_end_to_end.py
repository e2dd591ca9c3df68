"""embed-client end to end against the session's real tritonserver (CPU, demo checkpoints).

One run of ~50 records of mixed lengths with --merged and --classifier; every embedding is
compared with the model core's direct output (Embedder, CPU, float32, same checkpoint). The
expected frames come from VirNucPro's rules written out here (`expected_frames`), not from
the client's reader and prep; runs on the golden sample check the frames the original tool
wrote (skipped where ../shared/fixtures is absent).
"""

from __future__ import annotations

import asyncio
import csv
import json
import random
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embed_client import cli
from embed_client.classifier import HIGHEST_FILE, PREDICTIONS_FILE, from_state_dict
from embed_client.schedule import Item, Request
from embed_client.transport import Dispatcher, Server, ServerSpec, TransportConfig

pytestmark = pytest.mark.server

MODEL_INPUT = {"dnabert_s": "nucleotide", "esm2": "protein"}
CHUNK = 300
FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "virnucpro"

# The standard genetic code (NCBI table 1), as printed in textbooks: amino acid -> codons.
STANDARD_CODE = {
    "A": "GCT GCC GCA GCG", "R": "CGT CGC CGA CGG AGA AGG", "N": "AAT AAC", "D": "GAT GAC",
    "C": "TGT TGC", "Q": "CAA CAG", "E": "GAA GAG", "G": "GGT GGC GGA GGG", "H": "CAT CAC",
    "I": "ATT ATC ATA", "L": "TTA TTG CTT CTC CTA CTG", "K": "AAA AAG", "M": "ATG",
    "F": "TTT TTC", "P": "CCT CCC CCA CCG", "S": "TCT TCC TCA TCG AGT AGC",
    "T": "ACT ACC ACA ACG", "W": "TGG", "Y": "TAT TAC", "V": "GTT GTC GTA GTG",
    "*": "TAA TAG TGA",
}
AMINO_ACID = {codon: aa for aa, codons in STANDARD_CODE.items() for codon in codons.split()}
assert len(AMINO_ACID) == 64
_CODONS = sorted(c for c, aa in AMINO_ACID.items() if aa != "*")


class ExpectedFrame(NamedTuple):
    frame_id: str
    protein: str
    nucleotide: str


def run_cli(*argv: str) -> int:
    """The client's command line, run in this process; returns its exit code."""
    return cli.run(cli.build_parser().parse_args(list(argv)))


def write_sample(path: Path, n: int = 50, seed: int = 0) -> Path:
    """A FASTA of `n` records, 20 bp to 1.5 kb, open in frame 0 (so chunks have frames);
    some with an N, some lower-case, wrapped at 70 columns. Every length is at most 300 or
    a multiple of 300, so its 300-bp chunks are plain consecutive slices (`expected_frames`)."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            length = rng.choice([rng.randint(20, 150), rng.randint(150, CHUNK),
                                 CHUNK * rng.randint(2, 5)])
            seq = "".join(rng.choice(_CODONS) for _ in range(length // 3 + 1))[:length]
            if i % 9 == 4:
                p = rng.randrange(len(seq))
                seq = seq[:p] + "N" + seq[p + 1:]
            if i % 11 == 5:
                seq = seq.lower()
            fh.write(f">read{i} sample record {i}\n")
            fh.writelines(seq[k:k + 70] + "\n" for k in range(0, len(seq), 70))
    return path


def read_fasta(path: Path):
    """(id, sequence) per record: the header's first word, the lines joined."""
    records = []
    for line in path.read_text().splitlines():
        if line.startswith(">"):
            records.append((line[1:].split()[0], []))
        elif line.strip():
            records[-1][1].append(line.strip())
    return [(name, "".join(lines)) for name, lines in records]


def six_frames(chunk_id: str, chunk: str):
    """VirNucPro's frame records of one chunk, by its rules: the upper-cased chunk and its
    reverse complement (only ACGT complemented), frames 1-3 of each; a frame with a stop codon
    is dropped; codons holding another letter are left out of the protein; the nucleotide
    slice starts at the frame and is 3 * residues + 1 long (the original's off-by-one). The
    client drops frames left without any residue (the original keeps them empty)."""
    forward = chunk.upper()
    reverse = forward.translate(str.maketrans("ACGT", "TGCA"))[::-1]
    frames = []
    for strand, seq in (("F", forward), ("R", reverse)):
        for k in (1, 2, 3):
            codons = [seq[i:i + 3] for i in range(k - 1, len(seq) - 2, 3)]
            if any(AMINO_ACID.get(codon) == "*" for codon in codons):
                continue
            protein = "".join(AMINO_ACID[codon] for codon in codons if codon in AMINO_ACID)
            if protein:
                frames.append(ExpectedFrame(f"{chunk_id}{strand}{k}", protein,
                                            seq[k - 1:k + 3 * len(protein)]))
    return frames


def expected_frames(sample: Path):
    """The frames of a sample from `write_sample`: each record cut into consecutive 300-bp
    chunks (its length is at most 300 or a multiple of it), each chunk in six frames."""
    frames = []
    for name, seq in read_fasta(sample):
        assert len(seq) <= CHUNK or len(seq) % CHUNK == 0, (name, len(seq))
        for k in range(max(1, len(seq) // CHUNK)):
            frames += six_frames(f"{name}_chunk_{k + 1}", seq[k * CHUNK:(k + 1) * CHUNK])
    return frames


_EMBEDDERS = {}


def reference_embeddings(checkpoints: Path, model: str, sequences) -> np.ndarray:
    """The model core's own embeddings (CPU, float32) for the same demo checkpoint."""
    from embed_core.models import load_embedder
    from embed_core.runtime import RuntimeConfig

    key = (str(checkpoints), model)
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = load_embedder(model, checkpoints / model,
                                        RuntimeConfig(device="cpu", dtype="float32"))
    return _EMBEDDERS[key].embed(list(sequences))


def read_model_table(out: Path, model: str):
    table = pq.read_table(out / f"{model}.parquet")
    ids = table.column("id").to_pylist()
    vectors = table.column("embedding").combine_chunks()
    embeddings = vectors.flatten().to_numpy().reshape(len(ids), vectors.type.list_size)
    return table, ids, embeddings


def assert_complete_output(out: Path, sample: Path, checkpoints: Path, hidden: dict,
                           frames=None):
    """Every frame id exactly once per model, in input order, equal to the core's output
    (`frames`: the expected ones, by default those of a `write_sample` sample)."""
    frames = expected_frames(sample) if frames is None else frames
    for model, field in MODEL_INPUT.items():
        table, ids, embeddings = read_model_table(out, model)
        assert ids == [f.frame_id for f in frames], model
        assert len(set(ids)) == len(ids)
        assert table.schema.field("embedding").type == pa.list_(pa.float32(), hidden[model])
        assert table.schema.field("length").type == pa.int32()
        texts = [getattr(f, field) for f in frames]
        assert table.column("length").to_pylist() == [len(t) for t in texts]
        reference = reference_embeddings(checkpoints, model, texts)
        np.testing.assert_allclose(embeddings, reference, atol=1e-5, rtol=0, err_msg=model)
    return frames


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory, embed_server):
    """A random VirNucPro MLP for the demo widths (DNABERT-S + ESM-2), as .npz (no torch)."""
    rng = np.random.default_rng(7)
    width = embed_server.hidden_sizes["dnabert_s"] + embed_server.hidden_sizes["esm2"]
    state = {
        "hidden_layer.weight": rng.normal(0, 0.05, (512, width)),
        "hidden_layer.bias": rng.normal(0, 0.1, 512),
        "bn1.weight": rng.normal(1, 0.1, 512), "bn1.bias": rng.normal(0, 0.1, 512),
        "bn1.running_mean": rng.normal(0, 0.1, 512), "bn1.running_var": rng.uniform(0.5, 2, 512),
        "bn1.num_batches_tracked": np.array(10),
        "output_layer.weight": rng.normal(0, 0.05, (2, 512)),
        "output_layer.bias": rng.normal(0, 0.1, 2),
    }
    path = tmp_path_factory.mktemp("classifier") / "mlp.npz"
    np.savez(path, **{k: np.asarray(v, np.float32) for k, v in state.items()})
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, embed_server, classifier_file):
    """One full run: small windows and budgets so there are several blocks and requests."""
    base = tmp_path_factory.mktemp("e2e")
    sample = write_sample(base / "S1.fasta")
    args = cli.build_parser().parse_args([
        "--sample", str(sample), "--server", embed_server.grpc_url,
        "--metrics-url", embed_server.metrics_url, "--window", "40", "--token-budget", "3000",
        "--merged", "--classifier", str(classifier_file), "--progress", "plain"])
    code = cli.run(args)
    assert code == 0, (base / "S1_embeddings" / "summary.json").read_text()
    return sample, base / "S1_embeddings"   # the default --out: beside the sample


def test_embeddings_match_the_model_core(run_dir, embed_server):
    sample, out = run_dir
    frames = assert_complete_output(out, sample, embed_server.checkpoints,
                                    embed_server.hidden_sizes)
    assert len(frames) > 80  # the sample really has many frames of mixed lengths
    assert not (out / "parts").exists()


def test_summary_counts_are_consistent(run_dir):
    sample, out = run_dir
    summary = json.loads((out / "summary.json").read_text())
    frames = len(expected_frames(sample))
    assert summary["status"] == "complete" and summary["resumable"] is False
    read, prep = summary["stages"]["read"], summary["stages"]["prep"]
    assert read["records_in_file"] == read["records_kept"] == read["records_prepped"] == 50
    assert read["records_skipped"] == 0
    assert prep["frames"] == frames
    assert prep["chunks"] >= 50
    for model in MODEL_INPUT:
        sent = summary["stages"]["send"][model]
        assert sent["sequences_in"] == sent["sequences_sent"] == sent["sequences_received"] == frames
        assert sent["rejected"] == 0
        write = summary["stages"]["write"][model]
        assert write["rows_committed"] == write["rows_final"] == frames
    assert summary["stages"]["write"]["merged"]["rows_final"] == frames
    assert summary["stages"]["classifier"]["frames"] == frames
    assert summary["throughput"]["sequences_per_s"] > 0
    assert summary["elapsed_s"] > 0


def test_merged_features_are_dnabert_then_esm(run_dir, embed_server):
    _, out = run_dir
    _, ids, dna = read_model_table(out, "dnabert_s")
    _, _, esm = read_model_table(out, "esm2")
    merged = pq.read_table(out / "merged.parquet")
    width = sum(embed_server.hidden_sizes.values())
    assert merged.schema.field("embedding").type == pa.list_(pa.float32(), width)
    assert merged.column("id").to_pylist() == ids
    vectors = merged.column("embedding").combine_chunks().flatten().to_numpy()
    np.testing.assert_array_equal(vectors.reshape(len(ids), width), np.hstack([dna, esm]))


def test_predictions_follow_the_classifier(run_dir, classifier_file):
    _, out = run_dir
    _, ids, dna = read_model_table(out, "dnabert_s")
    _, _, esm = read_model_table(out, "esm2")
    with np.load(classifier_file) as data:
        probs = from_state_dict({k: data[k] for k in data.files}).predict_proba(
            np.hstack([dna, esm]))
    lines = (out / PREDICTIONS_FILE).read_text().splitlines()
    assert lines[0] == "Sequence_ID\tPrediction\tscore1\tscore2"
    assert [line.split("\t")[0] for line in lines[1:]] == ids
    rows = [line.split("\t") for line in lines[1:]]
    scores = np.array([[float(r[2]), float(r[3])] for r in rows], dtype=np.float32)
    # the run classifies a block at a time: BLAS may round the last bit differently
    np.testing.assert_allclose(scores, probs, rtol=1e-5, atol=1e-7)
    assert [r[1] for r in rows] == ["virus" if p[1] > p[0] else "others" for p in scores]
    chunks = {}
    for frame_id, p in zip(ids, scores):
        best = chunks.setdefault(frame_id[:-2], [p[0], p[1]])
        best[0], best[1] = max(best[0], p[0]), max(best[1], p[1])
    assert (out / HIGHEST_FILE).read_text().splitlines() == ["Modified_ID\tIs_Virus"] + [
        f"{c}\t{s2 >= s1}" for c, (s1, s2) in sorted(chunks.items())]


def golden_frames(chunk: int):
    """The frame records the original VirNucPro wrote for the golden sample, less those with
    no residue (the client drops them, counted)."""
    with open(FIXTURES / f"frames_{chunk}.tsv", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))[1:]   # after the header row
    return [ExpectedFrame(*row) for row in rows if row[1]]


@pytest.mark.skipif(not (FIXTURES / "sample.fasta").is_file(),
                    reason=f"golden VirNucPro fixtures not found at {FIXTURES}")
@pytest.mark.parametrize("chunk", [300, 500])
def test_golden_sample_gives_the_original_tools_frames(tmp_path, embed_server, chunk):
    out = tmp_path / "golden"
    args = cli.build_parser().parse_args([
        "--sample", str(FIXTURES / "sample.fasta"), "--server", embed_server.grpc_url,
        "--chunk", str(chunk), "--out", str(out), "--window", "16", "--progress", "plain"])
    assert cli.run(args) == 0, (out / "summary.json").read_text()
    frames = golden_frames(chunk)
    assert_complete_output(out, FIXTURES / "sample.fasta", embed_server.checkpoints,
                           embed_server.hidden_sizes, frames)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["prep"]["frames"] == len(frames)


def test_rejected_sequence_is_reported_by_id_not_retried(embed_server):
    """A request holding a sequence the server rejects (INVALID_ARGUMENT): it is split, the
    good sequences are embedded, the bad one is reported by its id, nothing is retried."""
    results, rejected = {}, []
    items = [Item(0, "good_chunk_1F1", "MKVLA"), Item(1, "bad_chunk_1F2", "MK1VLA"),
             Item(2, "good_chunk_1R1", "WWQ")]

    async def scenario():
        server = Server(ServerSpec.parse(embed_server.grpc_url, embed_server.metrics_url),
                        TransportConfig(max_in_flight=2))
        await server.connect(["esm2"])
        done = asyncio.Event()

        def on_result(request, embeddings):
            for item, row in zip(request.items, embeddings):
                results[item.frame_id] = row
            if len(results) + len(rejected) == 3:
                done.set()

        def on_reject(request, item, message):
            rejected.append((item.frame_id, message))
            if len(results) + len(rejected) == 3:
                done.set()

        dispatcher = Dispatcher([server], on_result, on_reject)
        dispatcher.submit([Request("esm2", 0, items)])
        dispatcher.start()
        await asyncio.wait_for(done.wait(), 60)
        await dispatcher.close()
        await server.close()
        return server

    server = asyncio.run(scenario())
    assert sorted(results) == ["good_chunk_1F1", "good_chunk_1R1"]
    assert [key for key, _ in rejected] == ["bad_chunk_1F2"]
    assert "'1'" in rejected[0][1]  # the server's message names the bad letter
    assert server.stats.retries == 0
    reference = reference_embeddings(embed_server.checkpoints, "esm2", ["MKVLA", "WWQ"])
    np.testing.assert_allclose(np.stack([results["good_chunk_1F1"], results["good_chunk_1R1"]]),
                               reference, atol=1e-5, rtol=0)
