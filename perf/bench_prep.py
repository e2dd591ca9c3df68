"""How fast the client prepares frames, per CPU core, against what the GPUs consume.

Writes a synthetic sample shaped like the real workload (reads of 150-500 bp, see
make_sample.py) to a temporary directory, then times each client stage in one process:
validate (parse and check every record), stream (parse only: the second read),
prep (chunk + six-frame translation), bucket (sort frames by protein length inside a
window), and the whole streamed path after validation (stream -> prep -> bucket).
Rates use this process's CPU time, so they are per core even on a busy machine; wall
time is shown too. The last column divides frames/s by the GPU consumption target of
ESM-2 3B (2,000 frames/s per H200): how many GPUs one client core can keep fed.

    python perf/bench_prep.py --reads 200000 --chunk-size 300 500
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, List

sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_sample, beside this file

from make_sample import synthetic_reads, write_records  # noqa: E402

from embed_client.reader import validate  # noqa: E402
from embed_client.virnucpro import Frame, PrepStats, prepare  # noqa: E402

GPU_FRAMES_PER_S = 2000.0  # ESM-2 3B frames/s per H200: the consumption target


def bucket(frames: Iterable[Frame], window: int) -> Iterator[Frame]:
    """Frames sorted by protein length inside consecutive windows of `window` frames."""
    block: List[Frame] = []
    for frame in frames:
        block.append(frame)
        if len(block) >= window:
            block.sort(key=lambda f: len(f.protein))
            yield from block
            block = []
    block.sort(key=lambda f: len(f.protein))
    yield from block


class Timer:
    """CPU and wall seconds of a block."""

    def __enter__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu = time.process_time() - self.cpu
        self.wall = time.perf_counter() - self.wall


def bench(path: Path, chunk_size: int, window: int) -> List[dict]:
    """One row per stage: records/s and frames/s per core."""
    rows = []

    def row(stage, timer, records, frames=None):
        rows.append({
            "stage": stage, "chunk": chunk_size, "cpu_s": timer.cpu, "wall_s": timer.wall,
            "records_per_s": records / timer.cpu if records else None,
            "frames_per_s": frames / timer.cpu if frames else None,
        })

    with Timer() as t:
        checked = validate(path)
    row("validate", t, checked.n_records)
    with Timer() as t:
        records = list(checked.records())
    row("stream", t, len(records))
    stats = PrepStats()
    with Timer() as t:
        frames = list(prepare(records, chunk_size, stats=stats))
    row("prep", t, len(records), len(frames))
    with Timer() as t:
        n = sum(1 for _ in bucket(frames, window))
    row(f"bucket/{window}", t, None, n)
    del frames, records
    with Timer() as t:
        n = sum(1 for _ in bucket(prepare(checked.records(), chunk_size), window))
    row("stream+prep+bucket", t, checked.n_kept, n)
    total = Timer()
    total.cpu = rows[0]["cpu_s"] + t.cpu
    total.wall = rows[0]["wall_s"] + t.wall
    row("validate+all", total, checked.n_kept, n)
    rows[-1]["stats"] = stats.as_dict()
    return rows


def print_table(rows: List[dict], sample: str) -> None:
    print(f"sample: {sample}")
    print(f"{'stage':<22}{'chunk':>6}{'cpu s':>8}{'wall s':>8}{'records/s':>12}{'frames/s':>12}{'x GPU':>8}")
    for r in rows:
        rec = f"{r['records_per_s']:,.0f}" if r["records_per_s"] else "-"
        fr = f"{r['frames_per_s']:,.0f}" if r["frames_per_s"] else "-"
        ratio = f"{r['frames_per_s'] / GPU_FRAMES_PER_S:.1f}" if r["frames_per_s"] else "-"
        print(f"{r['stage']:<22}{r['chunk']:>6}{r['cpu_s']:>8.2f}{r['wall_s']:>8.2f}{rec:>12}{fr:>12}{ratio:>8}")
        if "stats" in r:
            s = r["stats"]
            print(f"{'':<22}{'':>6}  {s['chunks'] / s['records']:.2f} chunks/record, "
                  f"{s['frames'] / s['chunks']:.2f} frames/chunk, {s['residues'] / max(s['frames'], 1):.0f} aa/frame")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Client prep throughput per CPU core vs the GPU consumption target.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--reads", type=int, default=100_000, help="reads in the synthetic sample")
    parser.add_argument("--chunk-size", type=int, nargs="+", default=[300, 500], help="VirNucPro chunk sizes to run")
    parser.add_argument("--window", type=int, default=10_000, help="frames sorted together by length")
    parser.add_argument("--format", choices=["fasta.gz", "fasta", "fastq.gz", "fastq"], default="fasta.gz",
                        help="sample file format")
    parser.add_argument("--line-width", type=int, default=0, help="wrap FASTA lines (0: one line per read)")
    parser.add_argument("--seed", type=int, default=0, help="sample seed")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    return parser


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench_prep_") as tmp:
        path = Path(tmp) / f"sample.{args.format}"
        with Timer() as t:
            write_records(path, synthetic_reads(args.reads, seed=args.seed),
                          fastq=args.format.startswith("fastq"), line_width=args.line_width or None)
        print(f"wrote {args.reads:,} reads ({path.stat().st_size / 1e6:.1f} MB) in {t.wall:.1f} s")
        rows = []
        for chunk_size in args.chunk_size:
            rows += bench(path, chunk_size, args.window)
        print_table(rows, f"{args.reads:,} reads of 150-500 bp, {args.format}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
