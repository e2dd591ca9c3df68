"""Deterministic synthetic samples shaped like the real workload (reads of 150-500 bp).

Random DNA has a stop codon about every 21 codons, so almost no frame of a 150-bp read
would be open; real reads come mostly from coding sequence. A fraction of the reads here
(`coding_fraction`) is therefore cut from stop-free codon runs, on either strand, at any
offset, which gives frame counts per chunk near the 1.3 seen on real data; a few reads
carry Ns. The same seed gives the same file.

    python perf/make_sample.py OUT.fasta.gz --reads 1000000
    python perf/make_sample.py client/data/demo.fasta --demo
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np

_ACGT = np.frombuffer(b"ACGT", dtype=np.uint8)
_STOPS = {"TAA", "TAG", "TGA"}
_SENSE = np.array(
    [list(a + b + c) for a in "ACGT" for b in "ACGT" for c in "ACGT" if a + b + c not in _STOPS]
).view(np.uint32).astype(np.uint8)  # [61, 3] ASCII codes of the 61 sense codons
_COMPLEMENT = bytes.maketrans(b"ACGT", b"TGCA")

DEMO_READS = 40
DEMO_CONTIG_LENGTHS = (1500, 3000)
DEMO_SEED = 20240302


def synthetic_reads(
    n: int,
    *,
    min_len: int = 150,
    max_len: int = 500,
    seed: int = 0,
    coding_fraction: float = 0.6,
    n_fraction: float = 0.01,
    prefix: str = "read",
    batch: int = 10_000,
) -> Iterator[Tuple[str, str]]:
    """(id, sequence) for `n` reads with lengths uniform in [min_len, max_len]."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    rng = np.random.default_rng(seed)
    done = 0
    while done < n:
        size = min(batch, n - done)
        lengths = rng.integers(min_len, max_len + 1, size)
        coding = rng.random(size) < coding_fraction
        with_n = rng.random(size) < n_fraction
        for i, (length, is_coding, has_n) in enumerate(zip(lengths.tolist(), coding.tolist(), with_n.tolist())):
            sequence = _coding(rng, length) if is_coding else _random(rng, length)
            if has_n:
                sequence = _add_ns(rng, sequence)
            yield f"{prefix}{done + i}", sequence.decode("ascii")
        done += size


def _random(rng: np.random.Generator, length: int) -> bytes:
    return _ACGT[rng.integers(0, 4, length)].tobytes()


def _coding(rng: np.random.Generator, length: int) -> bytes:
    """A stop-free codon run cut at a random offset, on a random strand."""
    codons = _SENSE[rng.integers(0, len(_SENSE), length // 3 + 2)].tobytes()
    offset = int(rng.integers(0, 3))
    sequence = codons[offset : offset + length]
    if rng.random() < 0.5:
        sequence = sequence.translate(_COMPLEMENT)[::-1]
    return sequence


def _add_ns(rng: np.random.Generator, sequence: bytes) -> bytes:
    letters = bytearray(sequence)
    for position in rng.integers(0, len(letters), int(rng.integers(1, 6))).tolist():
        letters[position] = ord("N")
    return bytes(letters)


def synthetic_contigs(n: int, lengths: Tuple[int, int] = (2000, 5000), *, seed: int = 1) -> Iterator[Tuple[str, str]]:
    """(id, sequence) for `n` longer contigs, half coding stretches, half random."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        length = int(rng.integers(lengths[0], lengths[1] + 1))
        parts = []
        while sum(map(len, parts)) < length:
            piece = int(rng.integers(200, 800))
            parts.append(_coding(rng, piece) if rng.random() < 0.5 else _random(rng, piece))
        yield f"contig{i}", b"".join(parts)[:length].decode("ascii")


def write_records(path, records, *, fastq: bool = False, line_width: Optional[int] = None) -> int:
    """Write (id, sequence) records as FASTA (wrapped at line_width) or FASTQ; gzip for a .gz path."""
    path = Path(path)
    if path.suffix == ".gz":  # mtime 0: the same records give the same bytes
        opener = lambda p: gzip.GzipFile(p, "wb", compresslevel=1, mtime=0)  # noqa: E731
    else:
        opener = lambda p: open(p, "wb")  # noqa: E731
    count = 0
    with opener(path) as out:
        lines = []
        for record_id, sequence in records:
            count += 1
            if fastq:
                lines.append(f"@{record_id}\n{sequence}\n+\n{'I' * len(sequence)}\n")
            elif line_width:
                wrapped = "\n".join(sequence[i : i + line_width] for i in range(0, len(sequence), line_width))
                lines.append(f">{record_id} synthetic\n{wrapped}\n")
            else:
                lines.append(f">{record_id} synthetic\n{sequence}\n")
            if len(lines) >= 4096:
                out.write("".join(lines).encode("ascii"))
                lines = []
        out.write("".join(lines).encode("ascii"))
    return count


def write_demo(path) -> int:
    """The bundled demo sample: a few dozen reads of 150-500 bp and two longer contigs."""
    reads = list(synthetic_reads(DEMO_READS, seed=DEMO_SEED, n_fraction=0.05))
    contigs = list(synthetic_contigs(2, DEMO_CONTIG_LENGTHS, seed=DEMO_SEED))
    return write_records(path, reads + contigs, line_width=70)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write a deterministic synthetic FASTA/FASTQ sample (reads of 150-500 bp).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("out", type=Path, help="output file (.gz: gzip-compressed)")
    parser.add_argument("--demo", action="store_true", help="write the bundled demo sample (other options ignored)")
    parser.add_argument("--reads", type=int, default=100_000, help="number of reads")
    parser.add_argument("--min-len", type=int, default=150, help="shortest read (bp)")
    parser.add_argument("--max-len", type=int, default=500, help="longest read (bp)")
    parser.add_argument("--contigs", type=int, default=0, help="longer contigs (2-5 kb) appended after the reads")
    parser.add_argument("--coding-fraction", type=float, default=0.6, help="fraction of reads cut from stop-free codon runs")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--fastq", action="store_true", help="write FASTQ instead of FASTA")
    parser.add_argument("--line-width", type=int, default=0, help="wrap FASTA lines (0: one line per sequence)")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.demo:
        count = write_demo(args.out)
    else:
        records = synthetic_reads(
            args.reads, min_len=args.min_len, max_len=args.max_len, seed=args.seed,
            coding_fraction=args.coding_fraction,
        )
        if args.contigs:
            from itertools import chain

            records = chain(records, synthetic_contigs(args.contigs, seed=args.seed + 1))
        count = write_records(args.out, records, fastq=args.fastq, line_width=args.line_width or None)
    print(f"wrote {count} records to {args.out}")
    return 0


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
