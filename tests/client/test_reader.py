"""The validated FASTA/FASTQ reader: formats, every kind of bad input, policies, memory."""

import gzip
import importlib.util
import random
import tracemalloc
from pathlib import Path

import pytest

from embed_client.errors import ClientError, InputError
from embed_client.reader import Record, validate

FASTA = (
    ">r1 first read, description ignored\n"
    "ACGTACGTAC\n"
    "acgtn\r\n"
    "\n"
    ">r2\n"
    "NRYKMSWBDHVU\n"
)
RECORDS = [Record("r1", "ACGTACGTACacgtn"), Record("r2", "NRYKMSWBDHVU")]
FASTQ = "@r1 first read\nACGTACGTACacgtn\n+\nIIIIIIIIIIIIIII\n@r2\nNRYKMSWBDHVU\n+r2\nIIIIIIIIIIII\n"


def _write(tmp_path, name, content):
    path = tmp_path / name
    data = content.encode() if isinstance(content, str) else content
    if name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def _error(path, policy="error"):
    with pytest.raises(InputError) as info:
        validate(path, policy)
    return info.value


# --- good input ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, content, fmt", [
    ("s.fasta", FASTA, "fasta"),
    ("s.fa.gz", FASTA, "fasta"),
    ("s.fastq", FASTQ, "fastq"),
    ("s.fq.gz", FASTQ, "fastq"),
    ("no_suffix", FASTQ, "fastq"),  # format and compression come from the content
])
def test_reads_fasta_and_fastq_plain_and_gzip(tmp_path, name, content, fmt):
    checked = validate(_write(tmp_path, name, content))
    assert (checked.format, checked.n_records, checked.n_kept, checked.skipped) == (fmt, 2, 2, ())
    assert checked.n_bases == 27 and checked.rna_records == 1
    # ids are the first word; case is kept; U (RNA) is read as T (r2)
    assert list(checked.records()) == RECORDS[:1] + [Record("r2", "NRYKMSWBDHVT")]
    assert list(checked.records()) == list(checked.records())  # a second pass reads it again


def test_comment_lines_before_the_first_record_are_allowed(tmp_path):
    checked = validate(_write(tmp_path, "c.fa", "# made by hand\n\n>r1\nACGT\n"))
    assert list(checked.records()) == [Record("r1", "ACGT")]


# --- bad records: each message names the file, the record and the line -------------------------


@pytest.mark.parametrize("content, record, line, words", [
    (">r1\nACGT\n>r2\nAAAA\n>r1 again\nCCCC\n", "r1", 5, "duplicate record id (first seen at line 1)"),
    (">r1\nACGT\n>r2\n\n>r3\nAC\n", "r2", 3, "empty sequence"),
    (">r1\nACGT\n>r2\n", "r2", 3, "empty sequence"),
    (">r1\nACGTACGTAC\nACGTAC-GTA\nACGT\n", "r1", 3, "invalid letter '-' at sequence position 17"),
    (">r1\nACGTACGTAC\nACGT\nAC*G\n", "r1", 4, "invalid letter '*' at sequence position 17"),
    (">r1\nACGT3\n", "r1", 2, "invalid letter '3' at sequence position 5"),
    (">r1\nACGTX\n", "r1", 2, "invalid letter 'X' at sequence position 5"),
    (">r1\nAC GT\n", "r1", 2, "invalid letter ' ' at sequence position 3"),
    (">r1\nACG\u00e9\n", "r1", 2, "invalid letter byte 0xc3 at sequence position 4"),
    (">r1\nACGT\n>\nACGT\n", None, 3, "the header has no record id"),
    ("@r1\nACGT\n+\nIIII\n@r2\nAC-T\n+\nIIII\n", "r2", 6, "invalid letter '-' at sequence position 3"),
    ("@r1\nACGT\n+\nIIII\n@r1\nACGT\n+\nIIII\n", "r1", 5, "duplicate record id (first seen at line 1)"),
    ("@r1\nACGT\n+\nIIII\n@r2\n\n+\n\n", "r2", 5, "empty sequence"),
])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_bad_records_are_reported_with_file_record_and_line(tmp_path, content, record, line, words, suffix):
    path = _write(tmp_path, "in.txt" + suffix, content)
    error = _error(path)
    assert (error.file, error.record, error.line, error.total) == (str(path), record, line, 1)
    assert words in error.problem
    message = str(error)
    assert message.startswith(f"{path}:{line}:") and words in message
    if record is not None:
        assert repr(record) in message


def test_fastq_with_quality_of_another_length(tmp_path):
    path = _write(tmp_path, "q.fq", "@r1\nACGT\n+\nIIII\n@r2\nACG\n+\nII\n@r3\nA\n+\nI\n")
    error = _error(path, "skip")  # a malformed file stops under either policy
    assert (error.record, error.line) == ("r2", 8)
    assert "malformed FASTQ" in str(error) and "qualities differ" in str(error) and str(path) in str(error)


def test_fastq_cut_short(tmp_path):
    path = _write(tmp_path, "q.fq.gz", "@r1\nACGT\n+\nIIII\n@r2\nACG\n")
    error = _error(path)
    assert (error.record, error.line) == ("r2", 7)
    assert "Premature end of file" in error.problem


# --- bad files -------------------------------------------------------------------------------


def test_truncated_gzip(tmp_path):
    text = "".join(f">read{i} x\n{'ACGT' * 60}\n" for i in range(5000))
    data = gzip.compress(text.encode())
    path = tmp_path / "cut.fa.gz"
    path.write_bytes(data[: len(data) // 2])
    error = _error(path, "skip")
    assert error.record.startswith("read") and error.line > 100
    assert "truncated or corrupt" in error.problem and error.file == str(path)
    header_line = 2 * int(error.record[4:]) + 1
    assert header_line <= error.line <= header_line + 2  # the file ends inside this record


def test_truncated_gzip_fastq(tmp_path):
    text = "".join(f"@read{i}\n{'ACGT' * 60}\n+\n{'I' * 240}\n" for i in range(5000))
    data = gzip.compress(text.encode())
    path = tmp_path / "cut.fq.gz"
    path.write_bytes(data[: len(data) // 2])
    error = _error(path)
    assert "truncated or corrupt" in error.problem and "the last complete record is 'read" in error.problem
    assert error.line % 4 == 1 and error.line > 100  # the header line where the data stops


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "bad.fa.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00" + b"not deflate data at all" * 20)
    error = _error(path)
    assert "corrupt" in error.problem and error.file == str(path)


@pytest.mark.parametrize("name, content, line, words", [
    ("text.fa", "hello world\n>r1\nACGT\n", 1, "not a FASTA or FASTQ file"),
    ("blank_then_text.fa", "\n\nsome;csv,data\n", 3, "not a FASTA or FASTQ file"),
    ("garbage.bin", bytes(random.Random(0).getrandbits(8) for _ in range(4096)).replace(b">", b"").replace(b"@", b""),
     None, "not a FASTA or FASTQ file"),
    ("comment_then_text.fa", "# note\nACGT\n", 2, "not a FASTA file"),
    ("empty.fa", "", None, "no records: the file is empty"),
    ("empty.fa.gz", "", None, "no records: the file is empty"),
    ("comments_only.fa", "# nothing here\n", None, "no records"),
])
def test_files_that_are_not_fasta_or_fastq(tmp_path, name, content, line, words):
    path = _write(tmp_path, name, content)
    error = _error(path, "skip")
    assert words in error.problem and error.file == str(path)
    if line is not None:
        assert error.line == line


def test_missing_file(tmp_path):
    error = _error(tmp_path / "nope.fa")
    assert "no such file" in str(error) and isinstance(error, ClientError)


def test_unknown_policy(tmp_path):
    with pytest.raises(ValueError):
        validate(_write(tmp_path, "s.fa", FASTA), "ignore")


# --- policies --------------------------------------------------------------------------------


def _many_problems():
    lines = []
    for i in range(60):
        lines.append(f">r{i}")
        lines.append("ACGTACGT" if i % 2 == 0 else "ACGT-ACGT")  # every odd record is bad
    lines += [">r0 duplicate", "ACGT", ">empty", ""]
    return "\n".join(lines) + "\n"


def test_error_policy_lists_the_first_problems_and_counts_all(tmp_path):
    path = _write(tmp_path, "many.fa", _many_problems())
    error = _error(path)
    assert error.total == 32  # 30 bad letters, one duplicate, one empty record
    assert len(error.problems) == 20
    assert [p.record for p in error.problems] == [f"r{i}" for i in range(1, 40, 2)]  # in file order
    assert "32 problems in" in str(error) and "... and 12 more" in str(error)


def test_skip_policy_returns_every_skipped_record_and_streams_the_rest(tmp_path):
    path = _write(tmp_path, "many.fa", _many_problems())
    checked = validate(path, "skip")
    assert (checked.n_records, checked.n_kept) == (62, 30)
    assert len(checked.skipped) == 32
    assert [(p.record, p.line) for p in checked.skipped[:2]] == [("r1", 4), ("r3", 8)]  # the bad letter's line
    assert ("r0", 121) == (checked.skipped[-2].record, checked.skipped[-2].line)
    assert "duplicate" in checked.skipped[-2].problem and "first seen at line 1" in checked.skipped[-2].problem
    assert (checked.skipped[-1].record, checked.skipped[-1].problem) == ("empty", "empty sequence")
    kept = list(checked.records())
    assert [r.id for r in kept] == [f"r{i}" for i in range(0, 60, 2)]  # the first r0 stays
    assert checked.n_bases == 30 * 8


def test_a_bad_record_and_its_duplicate_are_both_reported(tmp_path):
    path = _write(tmp_path, "d.fa", ">r1\nAC-G\n>r1\nACGT\n")
    error = _error(path)
    assert [(p.line, p.problem.split(" ")[0]) for p in error.problems] == [(2, "invalid"), (3, "duplicate")]


def test_the_file_changing_between_passes_is_detected(tmp_path):
    path = _write(tmp_path, "s.fa", FASTA)
    checked = validate(path)
    path.write_text(FASTA + ">r3\nACGT\n")
    with pytest.raises(InputError, match="changed since it was validated"):
        list(checked.records())


def test_input_error_for_one_problem():
    error = InputError("a.fa", "r7", 12, "empty sequence")
    assert str(error) == "a.fa:12: record 'r7': empty sequence"
    assert (error.file, error.record, error.line, error.problem, error.total) == ("a.fa", "r7", 12, "empty sequence", 1)


# --- the bundled demo sample ----------------------------------------------------------------


def test_demo_sample_is_what_make_sample_writes_and_is_valid(tmp_path):
    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("make_sample", root / "perf" / "make_sample.py")
    make_sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_sample)
    make_sample.write_demo(tmp_path / "demo.fasta")
    bundled = root / "client" / "data" / "demo.fasta"
    assert (tmp_path / "demo.fasta").read_bytes() == bundled.read_bytes()
    assert bundled.stat().st_size < 30_000
    checked = validate(bundled)
    lengths = [len(r.sequence) for r in checked.records()]
    assert checked.n_kept == len(lengths) >= 30 and checked.skipped == ()
    assert sum(150 <= n <= 500 for n in lengths) >= 30 and max(lengths) > 1000


# --- memory ----------------------------------------------------------------------------------


def test_a_large_file_streams_in_bounded_memory(tmp_path):
    rng = random.Random(11)
    block = "".join(rng.choice("ACGT") for _ in range(4096))
    path = tmp_path / "large.fa"
    with open(path, "w") as out:
        for i in range(20_000):  # ~10 MB
            start = rng.randrange(3500)
            out.write(f">read{i} sample=S1\n{block[start : start + rng.randint(400, 596)]}\n")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        checked = validate(path)
        n = sum(1 for _ in checked.records())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 20_000
    # a read block (256 KiB) and its lines, plus 8 bytes per id for duplicate detection
    assert peak < min(size / 5, 3_000_000), f"peak {peak} bytes for a {size}-byte file"
