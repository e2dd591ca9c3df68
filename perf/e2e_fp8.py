"""perf/e2e.py's fp8 phases (issue 17): each fp8 plan through the server beside the default plan, the
embeddings of every plan against fp32 per sequence, and the accuracy gate refusing a checkpoint
built to break it.

1. `fp8_passes`: per plan in --fp8-plans, a repository on the same checkpoints with `dtype` = the
   plan for both models (and `fp8_min_cosine` = --fp8-min-cosine: the random weights here fall
   below the gate's 0.999, so the speed passes set 0 and report the gate's figures), the server
   restarted on it, the mixed pass and each model alone as for the default plan (figures under
   report["plans"][plan], counts "<model> <plan>"), and the gate's line from the server's log.
2. `fp32_cosines` (after the servers): the first --fp32-rows frames of each model embedded in
   process in fp32 (PyTorch eager, padded attention, the checkpoint's weights), and the cosine per
   sequence of the rows each plan's server wrote against them.
3. `gate_refusal`: the demo-size ESM-2 with outlier channels (fp8_gate.with_outlier_channels):
   embed-export's check (check_fp8) of every plan on it and on the plain one at the default
   threshold, then embed-server with dtype fp8 on it, which must refuse to load the model and say
   why, and with fp8-smooth, which must serve it.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Optional

from e2e_checkpoints import build_model, model_dims, write_repository
from e2e_common import MODEL_NAMES, MODELS, Failure, Scenario, load_perf_module, log, number
from e2e_passes import alone_passes, mixed_pass
from e2e_report import refusal_text
from e2e_server import new_server, start_server, stop_server

GATE_LINE = re.compile(r"fp8 gate \(([\w-]+)\): pooled embeddings vs fp32 on (\d+) sequences: min cosine "
                       r"([0-9.]+), mean ([0-9.]+) \(threshold ([^)]+)\): (passed|REFUSED)")


def plans_to_run(s: Scenario) -> list:
    """--fp8-plans as a list: "auto" = fp8 where the device has FP8 GEMMs, none elsewhere (and none with
    --small: named plans run there on the CPU through the test-only EMBED_FP8_ON_CPU=1, which the
    server inherits)."""
    from embed_core import fp8
    text = s.args.fp8_plans
    if text == "none" or (text == "auto" and s.args.small):
        return []
    if s.args.small:
        os.environ[fp8.CPU_FLAG] = "1"
    problem = fp8.support_problem(s.device)
    if text == "auto":
        if problem:
            s.report["notes"].append(f"fp8 passes skipped: {problem}")
            return []
        return ["fp8"]
    if problem:
        raise Failure(f"--fp8-plans {text}: {problem}")
    return text.split(",")


def gate_lines(*paths: Path) -> dict:
    """{model: the gate's figures} from server logs (the load line, or the refusal)."""
    found = {}
    for path in paths:
        try:
            lines = Path(path).read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            match = GATE_LINE.search(line)
            model = next((m for m in MODELS if re.search(rf"\b{m}\b", line)), None)
            if match and model and model not in found:
                plan, n, low, mean, threshold, verdict = match.groups()
                found[model] = {"plan": plan, "sequences": int(n), "min_cosine": float(low),
                                "mean_cosine": float(mean), "threshold": threshold, "verdict": verdict}
    return found


def model_plan(m: str, plan: str) -> str:
    """The plan model `m` runs for `plan`: fp8-smooth needs a pre-LN encoder, so DNABERT-S runs fp8
    in that pass (the report's plan names the ESM-2 side)."""
    from embed_core.fp8 import SMOOTHED
    return "fp8" if plan in SMOOTHED and m == "dnabert_s" else plan


def fp8_passes(s: Scenario, plans: list, sample: Path, dna_sample: Path, frames: list) -> dict:
    """Each fp8 plan through a restarted server; returns {plan: the first rows per model}."""
    rows = {}
    for plan in plans:
        tag = f"_{plan}"
        params = {m: {**s.args.model_params.get(m, {}), "dtype": model_plan(m, plan),
                      "fp8_min_cosine": str(s.args.fp8_min_cosine)} for m in MODELS}
        repo = write_repository(s.args, s.dims, s.checkpoints, s.workdir / f"repository{tag}", params)
        start_server(s, repo, tag)
        s.report.setdefault("fp8_gate", {})[plan] = gate_lines(s.server.log_path, s.server.stdout_path)
        rows[plan] = mixed_pass(s, sample, frames, plan)
        alone_passes(s, sample, dna_sample, frames, plan)
        stop_server(s, tag)
        summarize_plan(s, plan)
    return rows


def summarize_plan(s: Scenario, plan: str) -> None:
    """A plan's headline figures beside the default plan's, in report["figures"] (for the targets)."""
    f, p = s.report["figures"], s.report["plans"][plan]
    for m in MODELS:
        v = p.get(f"{m}_tokens_per_s_per_gpu")
        f[f"{m}_{plan}_tokens_per_s_per_gpu"] = v
        base = f.get(f"{m}_tokens_per_s_per_gpu")
        f[f"{m}_{plan}_over_default"] = v / base if v and base else None
    f[f"{plan}_reads_1m_s"] = p.get("reads_1m_s")
    f[f"{plan}_frames_800k_s"] = p.get("frames_800k_s")
    log(f"{plan}: " + ", ".join(f"{MODEL_NAMES[m]} {number(f[f'{m}_{plan}_tokens_per_s_per_gpu'])} tokens/s "
                                f"({number(f[f'{m}_{plan}_over_default'], '{:.2f}x')})" for m in MODELS)
        + f", 1M reads {number(p.get('reads_1m_s'), '{:,.0f} s')}")


def fp32_rows(s: Scenario, m: str, sequences: list):
    """The checkpoint's weights (ESM-2 on a GPU: the bf16 copy the server loads) in fp32, PyTorch
    eager, padded attention: the reference every plan's rows are measured against."""
    import torch
    from e2e_baselines import model_seed, tokenizer_for
    from embed_core.models import DEFAULT_MAX_LENGTH
    from embed_core.runtime import Embedder, RuntimeConfig
    model = build_model(m, s.dims[m], s.device, model_seed(s.args.seed, m))
    if m == "esm2" and s.device.type == "cuda":
        model.to(torch.bfloat16)   # as write_checkpoints stored it
    model.float()
    embedder = Embedder(model, tokenizer_for(s, m), RuntimeConfig(
        device=str(s.device), dtype="float32", attention="padded", kernels="torch", max_length=DEFAULT_MAX_LENGTH[m]))
    try:
        return embedder.embed(sequences)
    finally:
        embedder.close()
        del model
        load_perf_module("bench_models").free_memory(s.device)


def cosine_figures(rows, reference) -> dict:
    import numpy as np
    from embed_core.fp8_gate import cosines
    n = min(len(rows), len(reference))
    cos = cosines(rows[:n], reference[:n])
    return {"sequences": int(n), "min": float(cos.min()), "p01": float(np.quantile(cos, 0.01)),
            "mean": float(cos.mean()), "below_0.999": int((cos < 0.999).sum())}


def fp32_cosines(s: Scenario, frames: list, rows_by_plan: dict) -> None:
    """report["fp32_cosine"][model][plan]: each plan's Triton rows against fp32, per sequence."""
    from e2e_baselines import SEQUENCE_FIELD
    t0 = time.monotonic()
    n = min(s.args.fp32_rows, len(frames))
    out = s.report.setdefault("fp32_cosine", {})
    for m in MODELS:
        reference = fp32_rows(s, m, [getattr(f, SEQUENCE_FIELD[m]) for f in frames[:n]])
        out[m] = {plan: cosine_figures(rows[m], reference) for plan, rows in rows_by_plan.items()}
        for plan, c in out[m].items():
            s.report["figures"][f"{m}_{plan}_cos_fp32_min"] = c["min"]
            s.report["figures"][f"{m}_{plan}_cos_fp32_mean"] = c["mean"]
        log(f"{MODEL_NAMES[m]} vs fp32 on {n:,} frames: " + ", ".join(
            f"{plan} min {c['min']:.5f} mean {c['mean']:.5f}" for plan, c in out[m].items()))
    s.phase("fp32_reference", t0)


def serve_once(s: Scenario, repo: Path, tag: str) -> dict:
    """embed-server on `repo` until ready or refused, then stopped: whether it came up, the gate's
    line for ESM-2 from its log, its log's path."""
    server = new_server(s, repo, tag, min(120.0, s.args.startup_timeout))
    try:
        server.wait_ready()
        ready = True
    except Failure:
        ready = False
    finally:
        server.stop()
    return {"ready": ready, "gate": gate_lines(server.log_path, server.stdout_path).get("esm2"),
            "log": str(server.log_path)}


def gate_refusal(s: Scenario) -> None:
    """The gate on a checkpoint built to break it, at the default threshold: embed-export's check of
    each plan on it and on the plain one; embed-server with dtype fp8 on it (must refuse to load)
    and with fp8-smooth (must come up: the smoothing takes the outliers into the weights)."""
    import argparse
    from embed_core.demo import write_demo_checkpoints
    from embed_core.esm2_checkpoint import load_esm2, write_hf_checkpoint
    from embed_core.fp8_gate import with_outlier_channels
    from embed_export.checkpoints import check_fp8, plans_for
    t0 = time.monotonic()
    folder = s.workdir / "gate"
    demo = write_demo_checkpoints(folder / "demo")
    encoder, _ = load_esm2(demo["esm2"])
    broken = write_hf_checkpoint(with_outlier_channels(encoder), folder / "esm2_outliers")
    result = {"checks": {name: [dict(plan=c.plan, sequences=c.sequences, min_cosine=c.min_cosine,
                                     mean_cosine=c.mean_cosine, threshold=c.threshold, passed=c.passed)
                                for c in check_fp8("esm2", path, plans_for("esm2"), device=str(s.device))]
                         for name, path in (("demo", demo["esm2"]), ("demo with outliers", broken))}}
    repo_args = argparse.Namespace(**{**vars(s.args), "instances_per_gpu": None})
    dims = model_dims(True)
    result["server"] = {}
    for plan in ("fp8", "fp8-smooth"):
        repo = write_repository(repo_args, dims, {"esm2": broken}, folder / f"repository_{plan}",
                                {"esm2": {"dtype": plan}})
        result["server"][plan] = serve_once(s, repo, f"_gate_{plan}")
    served = result["server"]
    result["refused"] = (not served["fp8"]["ready"] and (served["fp8"]["gate"] or {}).get("verdict") == "REFUSED")
    result["smooth_served"] = served["fp8-smooth"]["ready"] and (served["fp8-smooth"]["gate"] or {}).get(
        "verdict") == "passed"
    s.report["gate_refusal"] = result
    s.phase("gate_refusal", t0)
    log("fp8 gate: " + refusal_text(result))
    if not (result["refused"] and result["smooth_served"]):
        s.report["notes"].append(f"the fp8 gate in the server on the outlier checkpoint: {served}")


def fp8_phases(s: Scenario, plans: list, sample: Path, dna_sample: Path, frames: list,
               default_rows: Optional[dict]) -> None:
    """The fp8 passes (the default plan's server already stopped), fp32 cosines, the gate's refusal."""
    rows = {"default": default_rows} if default_rows is not None else {}
    rows.update(fp8_passes(s, plans, sample, dna_sample, frames))
    if s.args.fp32_rows > 0:
        fp32_cosines(s, frames, rows)
    gate_refusal(s)
