"""Compare an e2e run (perf/e2e.py's JSON) with a baseline; flag every figure more than 10% worse.

    python perf/compare.py $OUT/e2e.json                              # against perf/baseline.json
    python perf/compare.py new.json --baseline old.json --tolerance 0.05
    python perf/compare.py new.json --ratios-only                     # a run on other hardware

Each figure has a direction (higher or lower is better) and a kind:
  rate   an absolute speed (tokens/s, frames/s): depends on the machine;
  total  a speed or time of the whole machine (depends on its GPU count too: compared only when
         both runs used the same number of GPUs);
  ratio  measured within one run (ours / transformers, e2e / in-process, GPU utilization, busy
         fraction, scaling efficiency, per-GPU balance): compared as ratios, which also holds
         across machines.
A figure is "worse" when it moved the wrong way by more than the tolerance, relative to the
baseline value (higher-better: new < base x (1 - tol); lower-better: new > base x (1 + tol)).
Overhead (1 - e2e/in-process) and the per-GPU token spread are near zero, where a relative change
means nothing: they are compared through their complements e2e_over_inprocess and
per_gpu_token_balance. Figures null or absent on either side are listed as skipped.

A model's tokens/s per GPU (esm2_tokens_per_s_per_gpu, dnabert_s_tokens_per_s_per_gpu, the target
figures) comes from its client pass alone when that ran (the run then has
<model>_alone_tokens_per_s_per_gpu_wall), else from the mixed run, where both models' instances
time-slice each GPU and the figure is a lower bound (<model>_tokens_per_s_per_gpu_mixed). It is
compared only when both runs measured it the same way, else skipped with the reason; ESM-2's
mixed-run figure is compared on its own (esm2_tokens_per_s_per_gpu_mixed). Runs from before the
ESM-2 pass alone existed (perf/RESULTS.md) have ESM-2's from the mixed run.

Exit codes: 0 nothing worse, 1 at least one figure worse, 2 unreadable input.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

DEFAULT_BASELINE = Path(__file__).resolve().parent / "baseline.json"
DEFAULT_TOLERANCE = 0.10

# name: (better, kind)
FIGURES = {
    "e2e_frames_per_s": ("higher", "total"),
    "reads_1m_s": ("lower", "total"),
    "e2e_frames_per_s_per_gpu": ("higher", "rate"),
    "esm2_tokens_per_s_per_gpu": ("higher", "rate"),
    "dnabert_s_tokens_per_s_per_gpu": ("higher", "rate"),
    "esm2_tokens_per_s_per_gpu_mixed": ("higher", "rate"),
    "esm2_tokens_per_s_per_gpu_wall": ("higher", "rate"),
    "esm2_alone_tokens_per_s_per_gpu_wall": ("higher", "rate"),
    "dnabert_s_alone_tokens_per_s_per_gpu_wall": ("higher", "rate"),
    "inprocess_esm2_tokens_per_s": ("higher", "rate"),
    "inprocess_dnabert_s_tokens_per_s": ("higher", "rate"),
    "inprocess_frames_per_s": ("higher", "rate"),
    "hf_esm2_tokens_per_s": ("higher", "rate"),
    "e2e_over_inprocess": ("higher", "ratio"),
    "inprocess_over_hf_esm2": ("higher", "ratio"),
    "gpu_util_mean": ("higher", "ratio"),
    "esm2_busy_fraction": ("higher", "ratio"),
    "scaling_efficiency": ("higher", "ratio"),
    "per_gpu_token_balance": ("higher", "ratio"),
}

# target figure -> the figure a run has only when its target figure came from the model's pass alone
MEASURED_ALONE_WHEN = {"esm2_tokens_per_s_per_gpu": "esm2_alone_tokens_per_s_per_gpu_wall",
                       "dnabert_s_tokens_per_s_per_gpu": "dnabert_s_alone_tokens_per_s_per_gpu_wall"}


class InputProblem(Exception):
    pass


def load_figures(path: Path) -> dict:
    """figures of an e2e JSON (a file, or a folder holding e2e.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "e2e.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputProblem(f"{path}: {e}") from None
    figures = data.get("figures") if isinstance(data, dict) else None
    if not isinstance(figures, dict):
        raise InputProblem(f"{path}: no 'figures' object (not a perf/e2e.py JSON)")
    return figures


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def compare(baseline: dict, new: dict, tolerance: float = DEFAULT_TOLERANCE, ratios_only: bool = False) -> list:
    """One row per known figure: (name, kind, base, new, change, status); status is "ok", "better",
    "WORSE" or "skipped (...)". change is the relative move in the good direction (negative = worse)."""
    same_gpus = _number(baseline.get("gpus")) == _number(new.get("gpus"))
    rows = []
    for name, (better, kind) in FIGURES.items():
        b, n = _number(baseline.get(name)), _number(new.get(name))
        if ratios_only and kind != "ratio":
            rows.append((name, kind, b, n, None, "skipped (--ratios-only)"))
            continue
        if b is None or n is None:
            rows.append((name, kind, b, n, None, "skipped (no baseline)" if b is None else "skipped (not in run)"))
            continue
        marker = MEASURED_ALONE_WHEN.get(name)
        if marker:
            source = ["pass alone" if _number(figures.get(marker)) is not None else "mixed run"
                      for figures in (baseline, new)]
            if source[0] != source[1]:
                rows.append((name, kind, b, n, None,
                             f"skipped (baseline from the {source[0]}, run from the {source[1]})"))
                continue
        if kind == "total" and not same_gpus:
            rows.append((name, kind, b, n, None, f"skipped ({baseline.get('gpus')} vs {new.get('gpus')} GPUs)"))
            continue
        if b == 0:
            rows.append((name, kind, b, n, None, "skipped (baseline 0)"))
            continue
        change = (n - b) / abs(b) if better == "higher" else (b - n) / abs(b)
        status = "WORSE" if change < -tolerance else ("better" if change > tolerance else "ok")
        rows.append((name, kind, b, n, change, status))
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4g}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", type=Path, help="the new run's e2e.json (or its folder)")
    p.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE, help="baseline JSON (same schema)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="relative move in the wrong direction that counts as worse")
    p.add_argument("--ratios-only", action="store_true",
                   help="compare only same-run ratios (for a run on other hardware than the baseline)")
    args = p.parse_args(argv)
    try:
        base, new = load_figures(args.baseline), load_figures(args.run)
    except InputProblem as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    rows = compare(base, new, args.tolerance, args.ratios_only)
    print(f"compare: {args.run} against {args.baseline} (worse = more than {args.tolerance:.0%} the wrong way)")
    print(f"{'figure':44} {'kind':6} {'baseline':>12} {'new':>12} {'change':>8}  status")
    for name, kind, b, n, change, status in rows:
        ch = "-" if change is None else f"{change:+.1%}"
        print(f"{name:44} {kind:6} {_fmt(b):>12} {_fmt(n):>12} {ch:>8}  {status}")
    worse = [r[0] for r in rows if r[5] == "WORSE"]
    compared = sum(1 for r in rows if r[4] is not None)
    if worse:
        print(f"compare: {len(worse)} of {compared} compared figure(s) more than {args.tolerance:.0%} worse: "
              + ", ".join(worse))
        return 1
    print(f"compare: {compared} figure(s) compared, none more than {args.tolerance:.0%} worse")
    return 0


if __name__ == "__main__":
    sys.exit(main())
