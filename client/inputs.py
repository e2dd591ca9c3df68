"""Input sense: what the input is, said before anything is sent.

- RNA: U/u in nucleotide input (--sample, --dna) are read as T/t (reader.py), and the run
  says so once with the count of records that held U (also summary.json's
  `stages.read.records_with_u_read_as_t`).
- A protein FASTA given to --sample/--dna fails on its first amino-acid letter that is no
  nucleotide code, with the hint "this looks like a protein FASTA: use --proteins" (reader.py).
- A DNA FASTA given to --proteins: ACGTUN are all residue letters, so the reader accepts it;
  the rule here refuses it when the first records of at least DNA_MIN_LENGTH letters (up to
  DNA_RECORDS of them, among the first DNA_SCAN records) hold only A, C, G, T, U, N (any
  case), naming --dna and --sample. A real protein of 20 or more residues made of those six
  letters alone is not expected; no option overrides the rule.
"""

from __future__ import annotations

import logging

from . import reader
from .errors import InputError
from .integrity import CHUNK_BYTES

log = logging.getLogger("embed_client")

DNA_LETTERS = frozenset("ACGTUNacgtun")
DNA_MIN_LENGTH = 20      # letters a record needs to count for the DNA rule
DNA_RECORDS = 5          # the first records of that length looked at
DNA_SCAN = 1000          # records read at most to find them


def check(validated: reader.ValidatedInput, plain) -> None:
    """After validation: say that RNA is read as DNA; refuse a DNA FASTA given to --proteins."""
    if validated.rna_records:
        log.warning("%s: %d of %d records hold U (RNA): read as T", validated.path,
                    validated.rna_records, validated.n_kept)
    if plain == "proteins":
        refuse_dna(validated)


def refuse_dna(validated: reader.ValidatedInput) -> None:
    """InputError when the first long records of a --proteins input are all nucleotides."""
    looked, first = 0, None
    for scanned, record in enumerate(validated.records()):
        if scanned >= DNA_SCAN or looked >= DNA_RECORDS:
            break
        if len(record.sequence) < DNA_MIN_LENGTH:
            continue
        if not set(record.sequence) <= DNA_LETTERS:
            return
        looked += 1
        first = first or record.id
    if looked:
        raise InputError(
            str(validated.path), first, None,
            f"this looks like a DNA FASTA, not proteins: its first {looked} record"
            f"{'s' if looked > 1 else ''} of >= {DNA_MIN_LENGTH} letters hold only A, C, G, T, "
            f"U, N; use --dna (DNABERT-S embeddings per record) or --sample (VirNucPro: "
            f"chunks, six frames, both models)")


# ------------------------------------------------------------------ standard input


def spool_stdin(options):
    """`--sample -` (or --proteins/--dna -): standard input copied to <out>/stdin.input first, so
    the run (its sha256, validation, --resume) reads a file; returns the options reading it.

    On --resume the first run's copy is kept: standard input, when it holds data, must be the
    same bytes (else OutputError naming both sha256), and may be left empty (or a terminal)."""
    import dataclasses
    import os
    import sys

    from .errors import OutputError
    from .integrity import file_sha256, short
    from .sink import STDIN_FILE, OutputDir

    if str(options.sample) != "-":
        return options
    OutputDir(options.out).check(resume=options.resume)
    spooled = options.out / STDIN_FILE
    stream = getattr(sys.stdin, "buffer", None)
    tty = stream is None or sys.stdin.isatty()
    if options.resume and spooled.is_file() and tty:
        log.info("--resume: standard input is a terminal; reading the first run's copy %s",
                 spooled)
        return dataclasses.replace(options, sample=spooled)
    if tty:
        raise InputError("standard input", None, None, "is a terminal (or closed): pipe a "
                         "FASTA/FASTQ into it, or give the file's path")
    options.out.mkdir(parents=True, exist_ok=True)
    partial = spooled.with_name(STDIN_FILE + ".partial")
    size = 0
    with open(partial, "wb") as fh:
        for block in iter(lambda: stream.read(CHUNK_BYTES), b""):
            fh.write(block)
            size += len(block)
        fh.flush()
        os.fsync(fh.fileno())
    if options.resume and spooled.is_file():
        if size == 0:
            partial.unlink()
            log.info("--resume: standard input is empty; reading the first run's copy %s",
                     spooled)
        else:
            mine, theirs = file_sha256(spooled), file_sha256(partial)
            partial.unlink()
            if mine != theirs:
                raise OutputError(f"--resume: standard input (sha256 {short(theirs)}) is not "
                                  f"the first run's input {spooled} (sha256 {short(mine)})")
        return dataclasses.replace(options, sample=spooled)
    if size == 0:
        partial.unlink()
        raise InputError("standard input", None, None, "no records: standard input is empty")
    os.replace(partial, spooled)
    log.info("standard input spooled to %s (%s bytes)", spooled, f"{size:,}")
    return dataclasses.replace(options, sample=spooled)
