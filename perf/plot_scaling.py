"""Scaling plot from perf/e2e.py runs on 1, 2, 4, ... GPUs: total frames/s and per-GPU ESM-2 tokens/s.

    python perf/plot_scaling.py perf/results/e2e_h200x*_*.json --out perf/results/scaling.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(paths):
    """(gpus, frames/s total, ESM-2 tokens/s per GPU) per run, sorted by GPU count."""
    points = []
    for path in paths:
        figures = json.loads(Path(path).read_text())["figures"]
        points.append((figures["gpus"], figures["e2e_frames_per_s"], figures["esm2_tokens_per_s_per_gpu_wall"]))
    return sorted(points)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="e2e.json files of the same scenario")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = p.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = load(args.runs)
    gpus = [g for g, _, _ in points]
    frames = [f for _, f, _ in points]
    one = frames[gpus.index(1)] if 1 in gpus else None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(gpus, frames, "o-", label="measured")
    if one:
        left.plot(gpus, [one * g for g in gpus], "--", color="grey", label="linear from 1 GPU")
        for g, f in zip(gpus, frames):
            left.annotate(f"{f / one:.2f}x", (g, f), textcoords="offset points", xytext=(5, -12))
    left.set(xlabel="H200 GPUs", ylabel="frames/s (both models)", title="End to end through Triton",
             xticks=gpus)
    left.legend()
    right.bar([str(g) for g in gpus], [t / 1e3 for _, _, t in points])
    right.set(xlabel="H200 GPUs", ylabel="ESM-2 3B k tokens/s per GPU", title="Per-GPU ESM-2 rate")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}: " + ", ".join(f"{g} GPU {f:,.0f} frames/s" for g, f, _ in points))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
