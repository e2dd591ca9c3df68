"""VirNucPro prep: golden files from the original tool, and expectations worked out by hand."""

import csv
import random
from pathlib import Path

import pytest

from embed_client.reader import validate
from embed_client.virnucpro import (
    CODON_TABLE,
    Frame,
    PrepStats,
    chunk_record,
    chunk_starts,
    frames_for_chunk,
    frames_for_chunks,
    prepare,
)

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "virnucpro"
needs_fixtures = pytest.mark.skipif(
    not (FIXTURES / "sample.fasta").is_file(), reason=f"golden VirNucPro fixtures not found at {FIXTURES}"
)


def _tsv(name):
    with open(FIXTURES / name, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    return [tuple(row) for row in rows[1:]]  # drop the header row


@pytest.fixture(scope="module")
def sample_records():
    return list(validate(FIXTURES / "sample.fasta").records())


# --- golden comparisons with the original tool's output -------------------------------------


@needs_fixtures
@pytest.mark.parametrize("chunk_size", [300, 500])
def test_chunks_match_the_original(sample_records, chunk_size):
    expected = _tsv(f"chunks_{chunk_size}.tsv")
    got = [chunk for r in sample_records for chunk in chunk_record(r.id, r.sequence, chunk_size)]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g == e, f"chunk {e[0]}"


@needs_fixtures
@pytest.mark.parametrize("chunk_size", [300, 500])
def test_frames_match_the_original(sample_records, chunk_size):
    expected = _tsv(f"frames_{chunk_size}.tsv")
    chunks = [chunk for r in sample_records for chunk in chunk_record(r.id, r.sequence, chunk_size)]
    one_by_one = [tuple(f) for chunk in chunks for f in frames_for_chunk(*chunk)]
    assert one_by_one == expected
    assert [tuple(f) for f in frames_for_chunks(chunks)] == expected
    streamed = [tuple(f) for f in prepare(sample_records, chunk_size, keep_empty=True, batch_chunks=5)]
    assert streamed == expected


# --- chunking, by hand (docs/virnucpro.md, Chunking) ----------------------------------------


@pytest.mark.parametrize(
    "length, chunk_size, expected",
    [
        (301, 300, [(0, 300), (150, 301)]),
        (750, 300, [(0, 300), (249, 549), (498, 750)]),
        (1500, 300, [(0, 300), (300, 600), (600, 900), (900, 1200), (1200, 1500)]),
        (501, 500, [(0, 500), (250, 501)]),
        (1001, 500, [(0, 500), (333, 833), (666, 1001)]),
        (1499, 500, [(0, 500), (499, 999), (999, 1499)]),
        (2345, 500, [(0, 500), (468, 968), (936, 1436), (1404, 1904), (1872, 2345)]),
        # need = 13 > n - 1 = 7: zip cuts the shift list, every shift is 7, last chunk 294
        (2345, 300, [(k * 293, min(k * 293 + 300, 2345)) for k in range(8)]),
    ],
)
def test_worked_examples(length, chunk_size, expected):
    sequence = "".join(random.Random(length).choice("ACGT") for _ in range(length))
    chunks = chunk_record("s", sequence, chunk_size)
    assert [start for start, _ in expected] == chunk_starts(length, chunk_size)
    assert [c for c, _ in chunks] == [f"s_chunk_{k}" for k in range(1, len(expected) + 1)]
    assert [seq for _, seq in chunks] == [sequence[a:b] for a, b in expected]
    assert chunks[-1][1].endswith(sequence[-10:])  # the last chunk ends at L


@pytest.mark.parametrize("length", [1, 2, 3, 150, 299, 300])
def test_up_to_chunk_size_gives_one_unpadded_chunk(length):
    sequence = "acgT" * 100
    assert chunk_record("r", sequence[:length], 300) == [("r_chunk_1", sequence[:length])]


def test_chunks_keep_case_and_empty_gives_none():
    # L = 400: repeat 200, lower 100, need 100 > n - 1, so the one shift is 101: [199, 400)
    assert chunk_record("r", "acgtACGT" * 50, 300) == [
        ("r_chunk_1", ("acgtACGT" * 50)[:300]),
        ("r_chunk_2", ("acgtACGT" * 50)[199:]),
    ]
    assert chunk_record("r", "", 300) == []
    with pytest.raises(ValueError):
        chunk_record("r", "ACGT", 0)


# --- translation, by hand --------------------------------------------------------------------


def test_all_six_frames_and_the_off_by_one_slice():
    # forward ATGGCC; reverse complement GGCCAT
    assert frames_for_chunk("c", "ATGGCC") == [
        Frame("cF1", "MA", "ATGGCC"),  # slice [0:7] clipped at the end
        Frame("cF2", "W", "TGGC"),  # codon TGG at 1, slice [1:5]: 3*1 + 1 bases
        Frame("cF3", "G", "GGCC"),  # codon GGC at 2, slice [2:6]
        Frame("cR1", "GH", "GGCCAT"),
        Frame("cR2", "A", "GCCA"),
        Frame("cR3", "P", "CCAT"),
    ]


def test_a_frame_with_a_stop_is_discarded():
    # F1 = ATG TAA = "M*" is dropped; reverse complement TTACAT
    assert frames_for_chunk("c", "ATGTAA") == [
        Frame("cF2", "C", "TGTA"),
        Frame("cF3", "V", "GTAA"),
        Frame("cR1", "LH", "TTACAT"),
        Frame("cR2", "Y", "TACA"),
        Frame("cR3", "T", "ACAT"),
    ]
    # TAG TGA TAA: only frame 1 reads the stops
    assert [f.frame_id for f in frames_for_chunk("c", "TAGTGATAA")] == ["cF2", "cF3", "cR1", "cR2", "cR3"]


def test_codons_outside_acgt_are_dropped_not_x():
    frames = {f.frame_id: f for f in frames_for_chunk("c", "ATGNNNGCC")}
    # NNN is dropped: 2 residues, so the slice is 3*2 + 1 = 7 bases and no longer follows the codons
    assert frames["cF1"] == Frame("cF1", "MA", "ATGNNNG")
    assert frames["cR1"] == Frame("cR1", "GH", "GGCNNNC")
    assert all("X" not in f.protein for f in frames.values())


def test_only_acgt_are_complemented():
    # RACGT: reverse complement keeps R as it is -> ACGTR
    frames = {f.frame_id: f for f in frames_for_chunk("c", "RACGT")}
    assert frames["cR1"] == Frame("cR1", "T", "ACGT")
    assert frames["cR2"] == Frame("cR2", "R", "CGTR")


def test_lower_case_translates_as_upper_case():
    lower = frames_for_chunk("c", "atggcctaacgt")
    assert lower == frames_for_chunk("c", "ATGGCCTAACGT")
    assert all(f.nucleotide.isupper() for f in lower)


def test_short_chunks():
    # 3 bp: one codon per strand in frame 1; frames 2 and 3 have no codon (empty, kept by the original)
    assert frames_for_chunk("c", "ATG") == [
        Frame("cF1", "M", "ATG"), Frame("cF2", "", "T"), Frame("cF3", "", "G"),
        Frame("cR1", "H", "CAT"), Frame("cR2", "", "A"), Frame("cR3", "", "T"),
    ]
    assert [f.frame_id for f in frames_for_chunk("c", "TAA")] == ["cF2", "cF3", "cR1", "cR2", "cR3"]
    # under 3 bp: six empty frames, slices [k-1:k]
    assert frames_for_chunk("c", "AC") == [
        Frame("cF1", "", "A"), Frame("cF2", "", "C"), Frame("cF3", "", ""),
        Frame("cR1", "", "G"), Frame("cR2", "", "T"), Frame("cR3", "", ""),
    ]
    assert frames_for_chunks([]) == []


def test_frame_ids():
    frames = frames_for_chunk("read_7_chunk_12", "ATGGCCATTGTAATGGGCCGCTGAAAGGGTGCCCGATAG")
    assert frames and all(f.frame_id[:-2] == "read_7_chunk_12" for f in frames)
    assert {f.frame_id[-2:] for f in frames} <= {"F1", "F2", "F3", "R1", "R2", "R3"}


# --- against a plain transcription of the rules, on many random chunks ------------------------


def _reference_frames(chunk_id, sequence):
    """The rules of docs/virnucpro.md, one codon at a time."""
    seq = sequence.upper()
    complement = {"A": "T", "C": "G", "G": "C", "T": "A"}
    reverse = "".join(complement.get(letter, letter) for letter in reversed(seq))
    frames = []
    for strand, letter in ((seq, "F"), (reverse, "R")):
        for k in (1, 2, 3):
            protein = "".join(CODON_TABLE.get(strand[i : i + 3], "") for i in range(k - 1, len(strand) - 2, 3))
            if "*" not in protein:
                frames.append((f"{chunk_id}{letter}{k}", protein, strand[k - 1 : k + 3 * len(protein)]))
    return frames


def test_vectorised_translation_equals_the_rules_on_random_chunks():
    rng = random.Random(7)
    chunks = []
    for i in range(1500):
        length = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 30, 62, 150, 151, 299, 300, 501])
        alphabet = rng.choice(["ACGT", "ACGTacgt", "ACGTNNRYKMSWBDHVU"])
        chunks.append((f"c{i}", "".join(rng.choice(alphabet) for _ in range(length))))
    expected = [f for chunk in chunks for f in _reference_frames(*chunk)]
    assert [tuple(f) for f in frames_for_chunks(chunks)] == expected
    # a batch gives what each chunk gives alone
    assert [tuple(f) for f in frames_for_chunks(chunks[:200])] == [
        tuple(f) for chunk in chunks[:200] for f in frames_for_chunk(*chunk)
    ]


# --- the streaming prep ----------------------------------------------------------------------


def test_prepare_streams_in_order_and_counts_everything():
    rng = random.Random(3)
    records = [(f"r{i}", "".join(rng.choice("ACGTN") for _ in range(rng.randint(1, 900)))) for i in range(300)]
    records.append(("all_n", "N" * 200))  # six open frames with no codon: dropped and counted
    stats = PrepStats()
    frames = list(prepare(records, 300, stats=stats, batch_chunks=17))
    chunks = [c for rid, seq in records for c in chunk_record(rid, seq, 300)]
    everything = [f for chunk in chunks for f in frames_for_chunk(*chunk)]
    assert frames == [f for f in everything if f.protein]
    assert stats.records == len(records) and stats.chunks == len(chunks)
    assert stats.bases == sum(len(s) for _, s in records)
    assert stats.frames == len(frames) and stats.residues == sum(len(f.protein) for f in frames)
    assert stats.empty_frames == len(everything) - len(frames) >= 6
    assert stats.frames + stats.empty_frames + stats.frames_with_stop == 6 * stats.chunks
    emitting = {f.frame_id[:-2] for f in frames}
    assert stats.chunks_without_frames == len(chunks) - len(emitting)
    kept = PrepStats()
    assert list(prepare(records, 300, stats=kept, keep_empty=True)) == everything
    assert kept.frames == len(everything) and kept.empty_frames == stats.empty_frames
