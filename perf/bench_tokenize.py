"""How fast the server's DNABERT-S prep runs: microseconds per DNA sequence by batch size and threads.

    python3 perf/bench_tokenize.py                       # ~30 s; --tokenizer PATH for the published one

The server tokenizes each execute's sequences with `DnabertTokenizer.encode_batch` (letter check,
then the `tokenizers` BPE in Rust, parallel over a rayon pool, then ids to numpy). Through Triton
this prep was the bound on DNABERT-S (perf/RESULTS.md), so this times its stages on random DNA of
150-300 bp (the frames' DNA) for several batch sizes, each thread count in a fresh process
(RAYON_NUM_THREADS is read once, when the pool starts). The last column is the speed-up over one
thread: how much of the machine's cores a batch of that size can use.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BATCHES = (256, 1024, 4096)


def measure(tokenizer_path: str, sequences: int, batches, repeats: int = 3) -> list:
    """In this process: per batch size, median microseconds per sequence of each prep stage."""
    from embed_core.dnabert_s_tokenizer import DnabertTokenizer, check_dna_batch, random_dna

    tokenizer = DnabertTokenizer.from_file(tokenizer_path)
    rust = tokenizer._tokenizer
    encode = getattr(rust, "encode_batch_fast", rust.encode_batch)
    rng = np.random.default_rng(0)
    dna = [s[:int(n)] for s, n in zip(random_dna(sequences, 300, seed=1), rng.integers(150, 301, sequences))]
    encode(dna[:64])                                    # starts the thread pool
    rows = []
    for batch in batches:
        parts = [dna[i:i + batch] for i in range(0, len(dna) - batch + 1, batch)] or [dna]
        stages = {"check": [], "bpe": [], "to_numpy": [], "encode_batch": []}
        for _ in range(repeats):
            for part in parts:
                t0 = time.perf_counter()
                checked = check_dna_batch(part)
                t1 = time.perf_counter()
                encodings = encode(checked)
                t2 = time.perf_counter()
                [np.asarray(e.ids, dtype=np.int64) for e in encodings]
                t3 = time.perf_counter()
                tokenizer.encode_batch(part)            # the whole stage, as the server calls it
                t4 = time.perf_counter()
                for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    stages[name].append(seconds * 1e6 / len(part))
        rows.append({"batch": batch, **{k: float(np.median(v)) for k, v in stages.items()}})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: a 4096-token BPE trained "
                                                     "like the published one, as the e2e scenario uses)")
    p.add_argument("--sequences", type=int, default=16384)
    p.add_argument("--threads", default=None, help="comma-separated thread counts (default 1, 2, 4, ... cores)")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)   # one thread count, this process
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.tokenizer, args.sequences, BATCHES)))
        return 0
    cores = os.cpu_count() or 1
    threads = ([int(t) for t in args.threads.split(",")] if args.threads
               else sorted({1, *[2 ** k for k in range(1, 8) if 2 ** k < cores], cores}))
    with tempfile.TemporaryDirectory() as tmp:
        path = args.tokenizer
        if path is None:
            from embed_core.dnabert_s_tokenizer import train_demo_tokenizer
            path = str(train_demo_tokenizer(Path(tmp) / "tokenizer.json", vocab_size=4096))
        results = {}
        for n in threads:
            env = {**os.environ, "RAYON_NUM_THREADS": str(n), "TOKENIZERS_PARALLELISM": "true"}
            out = subprocess.run([sys.executable, __file__, "--child", str(n), "--tokenizer", path,
                                  "--sequences", str(args.sequences)], env=env, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                return 1
            results[n] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"DNABERT-S prep on {cores} cores (us per sequence, 150-300 bp; median of 3)")
    print(f"{'threads':>7} {'batch':>6} {'check':>7} {'bpe':>7} {'to_numpy':>8} {'encode_batch':>12} {'speed-up':>8}")
    for n, rows in results.items():
        for row, one in zip(rows, results[threads[0]]):
            print(f"{n:7d} {row['batch']:6d} {row['check']:7.2f} {row['bpe']:7.2f} {row['to_numpy']:8.2f} "
                  f"{row['encode_batch']:12.2f} {one['encode_batch'] / row['encode_batch']:8.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"cores": cores, "rows": {str(k): v for k, v in results.items()}}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
