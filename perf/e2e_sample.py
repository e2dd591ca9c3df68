"""perf/e2e.py's sample: synthetic reads shaped like the real workload, written as the client reads
them, and the frames the client will send, computed here with the client's own VirNucPro prep."""
from __future__ import annotations

import time
from pathlib import Path

from e2e_common import Scenario, load_perf_module, log


def shaped_reads(n: int, seed: int, coding_fraction: float, coding_gc: float, min_len: int = 150,
                 max_len: int = 500, n_fraction: float = 0.01):
    """(id, sequence) reads of min_len..max_len bp: `coding_fraction` cut from stop-free codon runs
    drawn with base composition GC = coding_gc (either strand, any offset), the rest uniform random,
    a few with Ns. make_sample's generator with GC-biased codons: at GC 0.56 the other frames of a
    coding read are open more often, as in real genomes, and a kept 300-bp chunk has ~1.3 open frames
    (make_sample's uniform codons give ~1.16)."""
    import numpy as np
    ms = load_perf_module("make_sample")
    base = {ord("A"): (1 - coding_gc) / 2, ord("T"): (1 - coding_gc) / 2,
            ord("G"): coding_gc / 2, ord("C"): coding_gc / 2}
    weights = np.array([base[a] * base[b] * base[c] for a, b, c in ms._SENSE.tolist()])
    cdf = np.cumsum(weights / weights.sum())
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, n)
    coding = rng.random(n) < coding_fraction
    with_n = rng.random(n) < n_fraction
    for i in range(n):
        length = int(lengths[i])
        if coding[i]:
            picks = np.minimum(np.searchsorted(cdf, rng.random(length // 3 + 2)), len(cdf) - 1)
            codons = ms._SENSE[picks].tobytes()
            offset = int(rng.integers(0, 3))
            seq = codons[offset:offset + length]
            if rng.random() < 0.5:
                seq = seq.translate(ms._COMPLEMENT)[::-1]
        else:
            seq = ms._random(rng, length)
        if with_n[i]:
            seq = ms._add_ns(rng, seq)
        yield f"read{i}", seq.decode("ascii")


def build_workload(args, workdir: Path) -> tuple:
    """(sample path, DNABERT-S pass sample path, frames, workload figures): the sample file, the one
    the DNABERT-S-alone pass sends (the same reads --dnabert-copies times over, ids suffixed _cK),
    and the frames the client will send."""
    import numpy as np
    from embed_client.virnucpro import PrepStats, prepare
    ms = load_perf_module("make_sample")
    reads = list(shaped_reads(args.reads, args.seed, args.coding_fraction, args.coding_gc))
    sample = workdir / "sample.fasta.gz"
    ms.write_records(sample, reads)
    dna_sample = sample
    if args.dnabert_copies > 1:
        dna_sample = workdir / f"sample_x{args.dnabert_copies}.fasta.gz"
        copies = ((f"{rid}_c{k}", seq) for k in range(args.dnabert_copies) for rid, seq in reads)
        ms.write_records(dna_sample, copies)
    stats = PrepStats()
    frames = list(prepare(reads, args.chunk, stats=stats))
    residues = np.fromiter((len(f.protein) for f in frames), dtype=np.int64, count=len(frames))
    kept_chunks = stats.chunks - stats.chunks_without_frames
    workload = {
        "reads": args.reads, "bases": stats.bases, "chunk": args.chunk, "chunks": stats.chunks,
        "kept_chunks": kept_chunks, "frames": len(frames),
        "frames_per_read": len(frames) / max(1, args.reads),
        "frames_per_kept_chunk": len(frames) / max(1, kept_chunks),
        "residues_mean": float(residues.mean()) if len(frames) else 0.0,
        "residues_min": int(residues.min()) if len(frames) else 0,
        "residues_max": int(residues.max()) if len(frames) else 0,
        "esm2_tokens": int(residues.sum() + 2 * len(frames)),
        "coding_fraction": args.coding_fraction, "coding_gc": args.coding_gc, "seed": args.seed,
        "sample_bytes": sample.stat().st_size,
    }
    return sample, dna_sample, frames, workload


def sample_phase(s: Scenario) -> tuple:
    """The sample phase: (sample path, DNABERT-S pass sample path, frames), the workload in the report."""
    t0 = time.monotonic()
    sample, dna_sample, frames, workload = build_workload(s.args, s.workdir)
    s.report["workload"] = workload
    s.phase("sample", t0)
    log(f"sample: {workload['reads']:,} reads -> {workload['frames']:,} frames "
        f"({workload['frames_per_kept_chunk']:.2f} per kept chunk), {workload['esm2_tokens']:,} ESM-2 tokens")
    return sample, dna_sample, frames
