"""Does asking for per-token rows cost the mean path anything? Both in one run, alternating.

    python perf/bench_per_token.py                  # ESM-2 3B and DNABERT-S at the real sizes (GPU)
    python perf/bench_per_token.py --small          # demo sizes: a CPU smoke run

For each model one random encoder (bench_models' builder) and one Embedder with the runtime's
default plan embed the same workload (bench_models' frames / chunks): the mean alone, then mean +
per-token rows (include=mean,per_token, the rows copied to the host), then the mean alone again,
repeated --rounds times. Printed: tokens/s of each, and mean-only rounds' spread, so that a
difference can be told from noise. The means of both paths must be equal (they are the same
forward; the check is exact on CPU, within bf16 rounding of the pooling order on GPU).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from e2e_common import load_perf_module

def timed(embedder, work, include, device) -> tuple:
    """(tokens/s, means) of one pass over `work` with `include`."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = embedder.launch_tokens(work, include=include).outputs()
    sync()
    return sum(len(t) for t in work) / (time.perf_counter() - start), out["mean"]


def bench(kind: str, args, bm, core, device) -> dict:
    small = args.small
    if kind == "esm2":
        from embed_core.esm2 import ESM2, Esm2Config
        dims, build, std = (bm.ESM2_SMALL if small else bm.ESM2_3B), (lambda d: ESM2(Esm2Config(**d))), None
        work = bm.protein_workload(args.sequences, seed=1)
    else:
        from embed_core.dnabert_s import DnabertS, DnabertSConfig
        dims, build, std = (bm.DNABERT_S_SMALL if small else bm.DNABERT_S_FULL), \
            (lambda d: DnabertS(DnabertSConfig(**d))), bm.dnabert_std
        work = bm.dna_workload(args.sequences, seed=1, vocab=dims["vocab_size"])
    with torch.device(device):
        model = build(dims)
    bm.random_init_(model, seed=0, std=std or (lambda name, p: 0.02))
    embedder = core.Embedder(model.eval(), None, core.RuntimeConfig(device=str(device)))
    embedder.warmup()
    timed(embedder, work[: max(1, len(work) // 10)], ("mean", "per_token"), device)   # warm both paths
    mean_only, with_tokens = [], []
    for _ in range(args.rounds):
        rate, means = timed(embedder, work, ("mean",), device)
        mean_only.append(rate)
        rate, means_too = timed(embedder, work, ("mean", "per_token"), device)
        with_tokens.append(rate)
        assert np.allclose(means, means_too, rtol=0, atol=1e-6 if device.type == "cpu" else 1e-2), kind
    rate, _ = timed(embedder, work, ("mean",), device)
    mean_only.append(rate)
    embedder.close()
    return {"model": kind, "plan": embedder.plan.describe(), "sequences": len(work),
            "tokens": int(sum(len(t) for t in work)), "mean_only_tokens_per_s": mean_only,
            "mean_and_per_token_tokens_per_s": with_tokens,
            "mean_only_median": float(np.median(mean_only)), "with_per_token_median": float(np.median(with_tokens))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="demo sizes (a CPU smoke run)")
    parser.add_argument("--models", default="esm2,dnabert_s", help="comma-separated subset of esm2,dnabert_s")
    parser.add_argument("--sequences", type=int, default=None, help="sequences per pass [6000 esm2 frames; small 64]")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (mean only, then with per-token)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    args.sequences = args.sequences or (64 if args.small else 6000)
    bm = load_perf_module("bench_models")
    core = bm.import_core()
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    results = []
    for kind in [m.strip() for m in args.models.split(",") if m.strip()]:
        result = bench(kind, args, bm, core, device)
        results.append(result)
        cost = 1 - result["with_per_token_median"] / result["mean_only_median"]
        spread = (max(result["mean_only_tokens_per_s"]) - min(result["mean_only_tokens_per_s"])) / result["mean_only_median"]
        print(f"{kind:10s} mean only {result['mean_only_median']:>12,.0f} tokens/s (spread {spread:.1%}) | "
              f"mean + per-token {result['with_per_token_median']:>12,.0f} tokens/s ({cost:+.1%} slower) | "
              f"{result['plan']}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
