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
