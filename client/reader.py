"""Streaming, validated reading of FASTA and FASTQ files (plain or compressed).

`validate(path, policy)` reads the whole file once and checks every record before
anything is sent: duplicate ids, empty records, letters outside the IUPAC nucleotide
codes, files that are not FASTA/FASTQ, truncated or corrupt compressed data, malformed
FASTQ. Every problem names the file, the record id and the 1-based line. Policy "error"
(the default) raises one `InputError` listing the first problems and their count; policy
"skip" keeps going and returns every skipped record with its reason. The returned
`ValidatedInput` then streams the kept records (`.records()`), reading the file again.

FASTQ goes through dnaio's C parser (4-line records, so line = 4 * index + 1). For FASTA,
dnaio's reader is itself a Python line loop that forgets line numbers; `_fasta` is the
same loop with the same rules (lines stripped, blank lines skipped) that keeps them, so
a bad letter is reported at its exact line even in wrapped records.

Memory is bounded: records are streamed; duplicate detection keeps one 8-byte hash per
record (80 MB for 10M reads, against ~1 GB for a Python set of id strings) and, only
when two hashes collide, reads the file once more to compare the real ids, so a hash
collision can never be reported as a duplicate.

Nucleotide input (VirNucPro's prep, DNABERT-S) may be RNA: U/u are IUPAC codes, read as T/t
(`ValidatedInput.rna_records` counts the records that held one; `.records()` yields them
with T), so six-frame translation reads their codons as DNA's. A letter that is an amino
acid and no nucleotide code (E, F, I, L, P, Q...) says the file looks like proteins.
"""

from __future__ import annotations

import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Tuple

import dnaio
import numpy as np
from embed_core.alphabets import IUPAC_NUCLEOTIDES
from xopen import xopen

from .errors import InputError, InputProblem

POLICIES = ("error", "skip")
MAX_LISTED = 20

_IUPAC_BYTES = (IUPAC_NUCLEOTIDES + IUPAC_NUCLEOTIDES.lower()).encode()
_U_AS_T = str.maketrans("Uu", "Tt")
# Amino-acid letters (and the stop '*') that are no IUPAC nucleotide code: a protein FASTA.
PROTEIN_ONLY = "EFIJLOPQXZ*"
_SNIFF_BYTES = 1 << 16
_BLOCK_BYTES = 1 << 18


def _decompression_errors() -> tuple:
    """Exceptions a truncated or corrupt compressed stream raises, whichever backend xopen picks."""
    errors = [EOFError, OSError, zlib.error]  # gzip.BadGzipFile is an OSError
    for module, name in (("isal.igzip_lib", "IsalError"), ("zlib_ng.zlib_ng", "error")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


_DECOMPRESSION_ERRORS = _decompression_errors()


class Alphabet(NamedTuple):
    """The letters a record may hold (both cases listed) and how a message names them."""

    letters: bytes
    name: str

    @classmethod
    def of(cls, letters: str, name: str) -> "Alphabet":
        return cls((letters.upper() + letters.lower()).encode(), f"{name} ({letters}, any case)")


NUCLEOTIDES = Alphabet(_IUPAC_BYTES, f"IUPAC nucleotide codes ({IUPAC_NUCLEOTIDES}, any case)")


class Record(NamedTuple):
    """One input record: id is the header's first word (Biopython's record.id); sequence keeps its case."""

    id: str
    sequence: str


class _Raw(NamedTuple):
    name: str  # the whole header after '>' or '@'
    sequence: str
    line: int  # 1-based line of the header
    bad: Optional[Tuple[str, int]]  # (problem, line) found while parsing, when checking


@dataclass(frozen=True)
class ValidatedInput:
    """A checked input file: its counts, the records skipped and why; `.records()` streams the rest."""

    path: Path
    format: str  # "fasta" or "fastq"
    n_records: int  # records in the file
    n_kept: int  # records that `.records()` yields
    n_bases: int  # bases in the kept records
    skipped: Tuple[InputProblem, ...]  # every skipped record with its reason, in file order
    skipped_indices: frozenset  # 0-based record indices of the skipped records
    rna_records: int = 0  # kept nucleotide records holding U/u: `.records()` reads them as T/t

    def records(self) -> Iterator[Record]:
        """Stream the kept records, in file order, reading the file again (U as T: RNA)."""
        skip = self.skipped_indices
        seen = 0
        rna = self.rna_records > 0
        for index, raw in enumerate(_raw(self.path, self.format, check=False)):
            seen += 1
            if skip and index in skip:
                continue
            sequence = raw.sequence.translate(_U_AS_T) if rna else raw.sequence
            yield Record(raw.name.split(None, 1)[0], sequence)
        if seen != self.n_records:
            raise InputError(
                str(self.path), None, None,
                f"the file changed since it was validated ({self.n_records} records then, {seen} now)",
            )


def validate(path, policy: str = "error", *, max_listed: int = MAX_LISTED,
             alphabet: Alphabet = NUCLEOTIDES) -> ValidatedInput:
    """Check every record of a FASTA/FASTQ file (plain or compressed) before anything is sent.

    policy "error": raise one InputError listing the first `max_listed` problems and the
    total count. policy "skip": skip bad records (a duplicate keeps its first occurrence)
    and return them all in `skipped`. Problems with the file itself (not FASTA/FASTQ,
    truncated or corrupt compressed data, malformed FASTQ, no records) always raise.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    path = Path(path)
    file = str(path)
    keep_all = policy == "skip"
    listed: list = []  # (index, InputProblem): all of them (skip) or the first max_listed (error)
    n_problems = 0
    hashes = array("q")  # hash of every non-empty record id
    records = bases = rna = 0
    count_rna = alphabet == NUCLEOTIDES  # U is selenocysteine in proteins: kept there
    fmt = _sniff(path)
    try:
        for index, raw in enumerate(_raw(path, fmt, check=alphabet)):
            records += 1
            record_id, problem = _check(raw)
            if record_id:
                hashes.append(hash(record_id))
            if problem is None:
                bases += len(raw.sequence)
                rna += count_rna and ("U" in raw.sequence or "u" in raw.sequence)
                continue
            n_problems += 1
            if keep_all or len(listed) < max_listed:
                listed.append((index, InputProblem(file, record_id or None, problem[1], problem[0])))
    except InputError as fatal:
        found = [p for _, p in listed[:max_listed]] + list(fatal.problems)
        raise InputError.from_problems(found, n_problems + fatal.total) from None
    if records == 0:
        raise InputError(file, None, None, f"no records: the file is empty or holds only blank/comment lines ({fmt})")

    duplicates, n_duplicates = _duplicates(path, fmt, hashes, None if keep_all else max_listed,
                                           alphabet)
    for index, problem, length in duplicates:
        bases -= length
        listed.append((index, problem))
    n_problems += n_duplicates
    listed.sort(key=lambda item: item[0])
    if n_problems and not keep_all:
        raise InputError.from_problems([p for _, p in listed[:max_listed]], n_problems)
    return ValidatedInput(
        path=path, format=fmt, n_records=records, n_kept=records - n_problems, n_bases=bases,
        skipped=tuple(p for _, p in listed), skipped_indices=frozenset(i for i, _ in listed),
        rna_records=rna,
    )


def _check(raw: _Raw) -> Tuple[str, Optional[Tuple[str, int]]]:
    """The record id and its first problem as (problem, line), or None when it is good."""
    words = raw.name.split(None, 1)
    record_id = words[0] if words else ""
    if not record_id:
        return record_id, ("the header has no record id", raw.line)
    if raw.bad is not None:
        return record_id, raw.bad
    if not raw.sequence:
        return record_id, ("empty sequence", raw.line)
    return record_id, None


def _duplicates(path: Path, fmt: str, hashes: array, limit: Optional[int],
                alphabet: Alphabet = NUCLEOTIDES):
    """Later occurrences of an id, as ([(index, problem, bases)], count), first `limit` listed.

    A record that already has another problem is not reported twice. Sorting the hashes
    finds candidate ids; one more read of the file, only when there are candidates,
    compares the real ids.
    """
    values = np.frombuffer(hashes, dtype=np.int64)
    if len(values) < 2:
        return [], 0
    values.sort()  # in place: the array is not needed in order any more
    repeated = values[1:][values[1:] == values[:-1]]
    if len(repeated) == 0:
        return [], 0
    candidates = set(repeated.tolist())
    first_line: dict = {}
    found = []
    count = 0
    for index, raw in enumerate(_raw(path, fmt, check=alphabet)):
        record_id, problem = _check(raw)
        if not record_id or hash(record_id) not in candidates:
            continue
        if record_id not in first_line:
            first_line[record_id] = raw.line
            continue
        if problem is not None:
            continue
        count += 1
        if limit is None or len(found) < limit:
            text = f"duplicate record id (first seen at line {first_line[record_id]})"
            found.append((index, InputProblem(str(path), record_id, raw.line, text), len(raw.sequence)))
    return found, count


def _sniff(path: Path) -> str:
    """'fasta' or 'fastq' from the first non-blank byte of the (decompressed) file."""
    file = str(path)
    try:
        with xopen(path, "rb", threads=0) as f:
            head = f.read(_SNIFF_BYTES)
    except FileNotFoundError:
        raise InputError(file, None, None, "no such file") from None
    except IsADirectoryError:
        raise InputError(file, None, None, "is a directory, not a FASTA/FASTQ file") from None
    except PermissionError:
        raise InputError(file, None, None, "permission denied") from None
    except _DECOMPRESSION_ERRORS as e:
        raise InputError(file, None, 1, f"compressed data is corrupt or truncated ({e})") from None
    stripped = head.lstrip()
    if not stripped:
        if len(head) < _SNIFF_BYTES:
            raise InputError(file, None, None, "no records: the file is empty")
        return "fasta"  # 64 KiB of whitespace: let the FASTA reader find out
    first = stripped[:1]
    if first in (b">", b"#"):
        return "fasta"
    if first == b"@":
        return "fastq"
    line = head[: len(head) - len(stripped)].count(b"\n") + 1
    found = stripped.split(b"\n", 1)[0][:20]
    raise InputError(
        file, None, line, f"not a FASTA or FASTQ file: a record must start with '>' or '@', found {found!r}"
    )


def _raw(path: Path, fmt: str, check: Optional[Alphabet]) -> Iterator[_Raw]:
    """Records; `check` (an Alphabet; None or False: no check) marks the first bad letter."""
    return _fasta(path, check) if fmt == "fasta" else _fastq(path, check)


def _fasta(path: Path, check: Optional[Alphabet]) -> Iterator[_Raw]:
    """FASTA records with their header line; lines are stripped and blank lines skipped, as dnaio does."""
    file = str(path)
    name: Optional[bytes] = None
    header_line = lineno = seq_len = 0
    parts: list = []
    bad = None
    rest = b""
    with xopen(path, "rb", threads=0) as f:
        read = getattr(f, "read1", f.read)  # read1: data up to a truncation comes before the error
        try:
            while True:
                block = read(_BLOCK_BYTES)
                if block:
                    lines = (rest + block).split(b"\n")
                    rest = lines.pop()  # an incomplete last line waits for the next block
                else:
                    lines = [rest] if rest else []
                for line in lines:
                    lineno += 1
                    s = line.strip()
                    if not s:
                        continue
                    if s[0] == 62:  # '>'
                        if name is not None:
                            yield _fasta_record(name, parts, header_line, bad)
                        name, header_line, parts, seq_len, bad = s[1:], lineno, [], 0, None
                    elif name is not None:
                        if check and bad is None and s.translate(None, check.letters):
                            bad = (_bad_letter(s, _first_bad(s, check), seq_len, check), lineno)
                        parts.append(s)
                        seq_len += len(s)
                    elif s[0] != 35:  # '#': comment lines are allowed before the first record
                        raise InputError(
                            file, None, lineno,
                            f"not a FASTA file: expected a '>' header line, found {s[:20]!r}",
                        )
                if not block:
                    break
        except _DECOMPRESSION_ERRORS as e:
            record = None if name is None else _decode_name(name)[0].split(None, 1)[0]
            raise InputError(
                file, record, lineno + 1,
                f"compressed data is truncated or corrupt, the file ends inside this record ({e})",
            ) from None
    if name is not None:
        yield _fasta_record(name, parts, header_line, bad)


def _fasta_record(name: bytes, parts: list, header_line: int, bad) -> _Raw:
    text, ok = _decode_name(name)
    if not ok and bad is None:
        bad = ("the header is not valid UTF-8", header_line)
    sequence = (parts[0] if len(parts) == 1 else b"".join(parts)).decode("latin-1")
    return _Raw(text, sequence, header_line, bad)


def _decode_name(name: bytes) -> Tuple[str, bool]:
    try:
        return name.decode(), True
    except UnicodeDecodeError:
        return name.decode(errors="backslashreplace"), False


def _first_bad(text: bytes, alphabet: Alphabet) -> int:
    """Position of the first byte of `text` outside `alphabet` (there is one)."""
    return text.index(text.translate(None, alphabet.letters)[:1])


def _bad_letter(text, position: int, offset: int, alphabet: Alphabet = NUCLEOTIDES) -> str:
    """Describe the first letter outside the IUPAC codes at `position` of a line (or sequence)."""
    letter = text[position]
    if isinstance(letter, int):
        letter = chr(letter)
    shown = repr(letter) if letter.isprintable() and ord(letter) < 128 else f"byte 0x{ord(letter):02x}"
    if alphabet == NUCLEOTIDES and letter.upper() in PROTEIN_ONLY:
        return (f"invalid letter {shown} at sequence position {offset + position + 1}, an amino "
                f"acid and no nucleotide code: this looks like a protein FASTA: use --proteins")
    return (
        f"invalid letter {shown} at sequence position {offset + position + 1}: "
        f"only {alphabet.name} are accepted"
    )


def _fastq(path: Path, check: Optional[Alphabet]) -> Iterator[_Raw]:
    """FASTQ records through dnaio's C parser; records are 4 lines, so line = 4 * index + 1."""
    file = str(path)
    index = 0
    name = None
    try:
        with dnaio.open(path, fileformat="fastq", open_threads=0) as reader:
            for r in reader:
                name = r.name
                bad = None
                raw = r.sequence.encode("ascii") if check else b""
                if check and raw.translate(None, check.letters):
                    bad = (_bad_letter(r.sequence, _first_bad(raw, check), 0, check), 4 * index + 2)
                yield _Raw(name, r.sequence, 4 * index + 1, bad)
                index += 1
    except dnaio.FileFormatError as e:
        line = None if e.line is None else e.line + 1
        raise InputError(file, _fastq_id_at(path, 4 * index + 1), line, f"malformed FASTQ: {e.message}") from None
    except _DECOMPRESSION_ERRORS as e:
        after = "" if name is None else f" (the last complete record is {name.split(None, 1)[0]!r})"
        raise InputError(
            file, None, 4 * index + 1,
            f"compressed data is truncated or corrupt after {index} complete records{after} ({e})",
        ) from None


def _fastq_id_at(path: Path, line: int) -> Optional[str]:
    """The record id on header line `line` of a FASTQ file (error path only), or None."""
    try:
        with xopen(path, "rb", threads=0) as f:
            for lineno, text in enumerate(f, 1):
                if lineno == line:
                    words = text[1:].split(None, 1) if text.startswith(b"@") else []
                    return words[0].decode(errors="backslashreplace") if words else None
    except _DECOMPRESSION_ERRORS:
        return None
    return None
