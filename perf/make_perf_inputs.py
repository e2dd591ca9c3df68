"""Write perf_analyzer `--input-data` JSON files of realistic sequences, one file per length bucket.

perf_analyzer plays a file's entries round-robin and builds a `-b N` request from N
consecutive entries, so it never sorts by length itself: one file per bucket emulates the
client's length bucketing, and `*_mixed.json` the unsorted worst case. Each entry is one
batch element of the models' `SEQUENCE` input (TYPE_STRING, dims [1]).

    python perf/make_perf_inputs.py --out perf/inputs
    perf_analyzer -m esm2 -i grpc -u localhost:8001 --input-data perf/inputs/esm2_len_070_099.json -b 32 ...

The sequence generators are shared with perf/locustfile.py.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# UniProtKB/Swiss-Prot amino-acid composition (%), so token statistics look like real proteins.
AMINO_ACID_FREQUENCIES = {
    "A": 8.25, "R": 5.53, "N": 4.06, "D": 5.45, "C": 1.37, "Q": 3.93, "E": 6.75, "G": 7.07,
    "H": 2.27, "I": 5.96, "L": 9.66, "K": 5.84, "M": 2.42, "F": 3.86, "P": 4.70, "S": 6.56,
    "T": 5.34, "W": 1.08, "Y": 2.92, "V": 6.87,
}
_AA = list(AMINO_ACID_FREQUENCIES)
_AA_WEIGHTS = list(AMINO_ACID_FREQUENCIES.values())

# Lengths as the VirNucPro prep produces them: six-frame translations of 300/500 bp chunks
# (proteins 40-170 aa) and the chunks themselves (120-500 bp, short last chunks included).
PROTEIN_LENGTHS = (40, 170)
DNA_LENGTHS = (120, 500)

# Inclusive length buckets, in letters.
BUCKETS = {
    "esm2": [(40, 69), (70, 99), (100, 129), (130, 170)],
    "dnabert_s": [(120, 249), (250, 379), (380, 500)],
}


def random_protein(rng: random.Random, lo: int = PROTEIN_LENGTHS[0], hi: int = PROTEIN_LENGTHS[1]) -> str:
    """A protein of uniform random length in [lo, hi] with natural residue frequencies."""
    return "M" + "".join(rng.choices(_AA, weights=_AA_WEIGHTS, k=rng.randint(lo, hi) - 1))


def random_dna(rng: random.Random, lo: int = DNA_LENGTHS[0], hi: int = DNA_LENGTHS[1],
               n_rate: float = 0.001) -> str:
    """A DNA sequence of uniform random length in [lo, hi], ~50% GC, with rare N (valid IUPAC)."""
    letters = rng.choices("ACGTN", weights=[(1 - n_rate) / 4] * 4 + [n_rate], k=rng.randint(lo, hi))
    return "".join(letters)


def random_sequence(model: str, rng: random.Random, lo: int | None = None, hi: int | None = None) -> str:
    """A sequence for `model` ("esm2" -> protein, "dnabert_s" -> DNA) within [lo, hi]."""
    if model == "esm2":
        return random_protein(rng, lo or PROTEIN_LENGTHS[0], hi or PROTEIN_LENGTHS[1])
    if model == "dnabert_s":
        return random_dna(rng, lo or DNA_LENGTHS[0], hi or DNA_LENGTHS[1])
    raise ValueError(f"unknown model {model!r}: expected esm2 or dnabert_s")


def perf_input(sequences: list[str]) -> dict:
    """perf_analyzer's real-input JSON: one batch-1 entry per sequence (STRING content, shape [1])."""
    return {"data": [{"SEQUENCE": {"content": [s], "shape": [1]}} for s in sequences]}


def write_inputs(out: Path, count: int = 512, seed: int = 0) -> list[Path]:
    """Write one file per (model, bucket) plus one mixed-length file per model; return the paths."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for model, buckets in BUCKETS.items():
        for lo, hi in buckets:
            path = out / f"{model}_len_{lo:03d}_{hi:03d}.json"
            path.write_text(json.dumps(perf_input([random_sequence(model, rng, lo, hi) for _ in range(count)])))
            written.append(path)
        path = out / f"{model}_mixed.json"
        path.write_text(json.dumps(perf_input([random_sequence(model, rng) for _ in range(count)])))
        written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("perf/inputs"), help="output folder")
    parser.add_argument("--count", type=int, default=512, help="sequences per file")
    parser.add_argument("--seed", type=int, default=0, help="random seed (files are reproducible)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.count < 1:
        raise SystemExit("--count must be >= 1")
    for path in write_inputs(args.out, args.count, args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
