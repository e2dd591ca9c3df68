"""What every phase of perf/e2e.py shares: the figure and target names, the run's state, small helpers."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("esm2", "dnabert_s")
MODEL_NAMES = {"esm2": "ESM-2", "dnabert_s": "DNABERT-S"}
SCHEMA = "e2e/1"

# name: (operator, value); scaling's value is per GPU (x n GPUs), the rest absolute.
TARGETS = {
    "esm2_tokens_per_s_per_gpu": (">=", 100_000),
    "dnabert_s_tokens_per_s_per_gpu": (">=", 2_000_000),
    "overhead": ("<=", 0.05),
    "gpu_util_mean": (">=", 0.90),
    "reads_1m_s": ("<", 360.0),
    "scaling_vs_one_gpu": (">=", 0.95),   # x n_gpus: 1.9 on two GPUs
    "per_gpu_token_spread": ("<=", 0.05),
    # issue 17: the fp8 plan (every linear in e4m3) through Triton
    "esm2_fp8_tokens_per_s_per_gpu": (">=", 150_000),
    "dnabert_s_fp8_tokens_per_s_per_gpu": (">=", 2_200_000),
    "fp8_reads_1m_s": ("<", 360.0),
}

# Every figure e2e.json carries (null where not measured in that run), for compare.py and the test.
ALL_FIGURES = (
    "gpus", "send_s", "client_elapsed_s", "embedding_window_s",
    "e2e_frames_per_s", "e2e_frames_per_s_per_gpu", "reads_1m_s", "frames_800k_s",
    "esm2_tokens_per_s_per_gpu", "dnabert_s_tokens_per_s_per_gpu",
    *(f"{m}_{k}" for m in ("esm2", "dnabert_s") for k in (
        "tokens", "sequences_server", "tokens_per_s_per_gpu_wall", "tokens_per_s_per_gpu_mixed", "busy_s",
        "busy_fraction", "requests", "executions", "queue_ms_per_request", "compute_ms_per_request",
        "queue_fraction", "server_prep_s", "server_compute_s", "server_execute_s")),
    *(f"{m}_alone_{k}" for m in ("esm2", "dnabert_s") for k in (
        "tokens_per_s_per_gpu", "tokens_per_s_per_gpu_wall", "server_prep_s", "server_compute_s",
        "server_execute_s")),
    "gpu_util_mean", "gpu_util_samples",
    "inprocess_esm2_tokens_per_s", "inprocess_dnabert_s_tokens_per_s", "inprocess_frames_per_s", "inprocess_frames",
    "hf_esm2_tokens_per_s", "hf_esm2_frames", "inprocess_over_hf_esm2",
    "e2e_over_inprocess", "overhead",
    "scaling_vs_one_gpu", "scaling_efficiency", "per_gpu_token_spread", "per_gpu_token_balance",
    # the fp8 plan's passes (e2e_fp8; other plans add the same names with theirs) and every plan's
    # rows against fp32
    "esm2_fp8_tokens_per_s_per_gpu", "dnabert_s_fp8_tokens_per_s_per_gpu", "esm2_fp8_over_default",
    "dnabert_s_fp8_over_default", "fp8_reads_1m_s", "fp8_frames_800k_s",
    *(f"{m}_{plan}_cos_fp32_{k}" for m in ("esm2", "dnabert_s") for plan in ("default", "fp8") for k in ("min", "mean")),
)


def log(message: str) -> None:
    print(f"e2e: {message}", flush=True)


class Failure(Exception):
    """The scenario cannot go on; the message says why (and where the logs are)."""


def load_perf_module(name: str):
    """perf/<name>.py as a module (perf/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "perf" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tail(path: Path, lines: int) -> str:
    """The last lines of a log, indented, for a failure message."""
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return f"({path}: not written)"
    return "\n".join(f"  | {line[:300]}" for line in text[-lines:])


def number(v, fmt="{:,.0f}", none="-") -> str:
    """A figure as printed: `none` when it was not measured."""
    return none if v is None else fmt.format(v)


def send_seconds(summary: dict) -> Optional[float]:
    """The client's send time from its summary.json, None when absent or zero."""
    return float(summary.get("send_elapsed_s") or 0) or None


def json_safe(obj):
    """`obj` with non-finite floats as null and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):   # numpy scalars
        return json_safe(obj.item())
    return obj


def output_paths(out: Path) -> tuple:
    """(json path, out directory): --out DIR writes DIR/e2e.json; --out FILE.json writes there."""
    if out.suffix == ".json":
        out.parent.mkdir(parents=True, exist_ok=True)
        return out, out.parent
    out.mkdir(parents=True, exist_ok=True)
    return out / "e2e.json", out


@dataclasses.dataclass
class Scenario:
    """One run's state that every phase reads: the options, the report (rewritten to e2e.json after
    every phase, so a run killed at its time limit still leaves its figures) and where things go.
    `server` and `sampler` are held here so that the run can stop them whatever failed."""

    args: argparse.Namespace
    json_path: Path
    out_dir: Path
    t_start: float
    report: dict
    extra_path: Optional[str] = None   # PYTHONPATH entry for the subprocesses (packages from this checkout)
    workdir: Optional[Path] = None
    device: Any = None
    dims: Optional[dict] = None
    checkpoints: Optional[dict] = None   # {model: checkpoint folder}, written by the checkpoints phase
    server: Any = None
    sampler: Any = None
    fp8_plans: tuple = ()                # the fp8 plans this run puts through the server (e2e_fp8)

    @classmethod
    def start(cls, args: argparse.Namespace) -> "Scenario":
        json_path, out_dir = output_paths(args.out)
        report = {"schema": SCHEMA, "status": "running", "argv": sys.argv[1:], "config": {}, "workload": {},
                  "phases": {}, "figures": dict.fromkeys(ALL_FIGURES), "targets": {}, "counts": {}, "notes": []}
        return cls(args, json_path, out_dir, time.monotonic(), report)

    def save(self) -> None:
        self.json_path.write_text(json.dumps(json_safe(self.report), indent=1) + "\n")

    def phase(self, name: str, t0: float) -> None:
        """Records a phase's seconds since `t0` and saves the report."""
        self.report["phases"][name] = round(time.monotonic() - t0, 1)
        self.save()

    def seconds_left(self) -> float:
        """What --budget-s leaves of the whole command's time."""
        return self.args.budget_s - (time.monotonic() - self.t_start)
