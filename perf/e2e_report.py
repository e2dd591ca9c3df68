"""perf/e2e.py's report: the targets judged, the scaling against a one-GPU run, and the table printed last."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

from e2e_common import MODEL_NAMES, TARGETS, number
from e2e_options import instances_text, model_params_text

TARGET_FORMATS = {"overhead": "{:.0%}", "gpu_util_mean": "{:.0%}", "reads_1m_s": "{:,.0f} s", "fp8_reads_1m_s": "{:,.0f} s",
                  "scaling_vs_one_gpu": "{:.2f}x", "per_gpu_token_spread": "{:.0%}"}   # others: "{:,.0f}"


def evaluate_targets(figures: dict, small: bool) -> dict:
    """{target: its threshold, value and PASS / FAIL / n/a / unmeasured}."""
    out = {}
    n = figures.get("gpus") or 1
    for name, (op, value) in TARGETS.items():
        if name == "scaling_vs_one_gpu":
            value = round(value * n, 3)
        v = figures.get(name)
        if name in ("scaling_vs_one_gpu", "per_gpu_token_spread") and n < 2:
            status = "n/a (one GPU)"
        elif small:
            status = "n/a (--small)"
        elif v is None:
            status = "unmeasured"
        else:
            met = {"<=": v <= value, ">=": v >= value, "<": v < value}[op]
            status = "PASS" if met else "FAIL"
        shown = TARGET_FORMATS.get(name, "{:,.0f}")
        out[name] = {"target": f"{op} {shown.format(value)}", "op": op, "threshold": value, "value": v,
                     "status": status}
    return out


def scaling(args, report: dict) -> None:
    """total frames/s vs a one-GPU run's (--one-gpu-json), when this run used several GPUs."""
    f = report["figures"]
    if not args.one_gpu_json or (f.get("gpus") or 1) < 2:
        return
    try:
        one = json.loads(Path(args.one_gpu_json).read_text())
        base = one.get("figures", {}).get("e2e_frames_per_s")
    except (OSError, ValueError) as e:
        report["notes"].append(f"--one-gpu-json unreadable: {e}")
        return
    if base and f.get("e2e_frames_per_s"):
        f["scaling_vs_one_gpu"] = f["e2e_frames_per_s"] / base
        f["scaling_efficiency"] = f["scaling_vs_one_gpu"] / f["gpus"]
    else:
        report["notes"].append("--one-gpu-json has no figures.e2e_frames_per_s")


def _phases(f: dict, prefix: str) -> str:
    """ "prep | compute | execute" seconds of one model's instances (figures <prefix>server_*_s)."""
    return " | ".join(number(f.get(f"{prefix}server_{k}_s"), "{:,.2f}") for k in ("prep", "compute", "execute"))


def table_header(report: dict) -> List[str]:
    f, w, c = report["figures"], report["workload"], report["config"]
    gpus = int(f.get("gpus") or 1)
    return [
        "",
        f"== e2e: {gpus} x {c['device']}, {w['reads']:,} reads -> {w['frames']:,} frames "
        f"({w['frames_per_kept_chunk']:.2f} per kept {w['chunk']}-bp chunk, residues {w['residues_min']}-"
        f"{w['residues_max']} mean {w['residues_mean']:.0f}), {c['models_desc']}",
        f"server: instances per GPU {instances_text(c.get('instances') or {})}; config parameters: "
        f"{model_params_text(c.get('model_params') or {})}",
        "phases (s): " + " | ".join(f"{k} {v:.0f}" for k, v in report["phases"].items() if v is not None),
        f"{'figure':48} {'value':>18}   target",
    ]


def table_rows(report: dict) -> List[str]:
    """One line per figure, with its target and status where it has one."""
    f, c, t = report["figures"], report["config"], report["targets"]
    gpus = int(f.get("gpus") or 1)
    lines = []

    def row(label, value, target=None):
        status = f"{t[target]['target']:>14}  {t[target]['status']}" if target else ""
        lines.append(f"{label:48} {value:>18}   {status}")

    row("frames/s through Triton (total)", number(f.get("e2e_frames_per_s")))
    row("frames/s per GPU", number(f.get("e2e_frames_per_s_per_gpu")))
    for m, name in MODEL_NAMES.items():   # the target figure: the pass alone when it ran, else the mixed run
        alone = f.get(f"{m}_alone_tokens_per_s_per_gpu") is not None
        several = (c.get("instances") or {}).get(m, 1) > 1   # overlapping executions: wall time
        row(f"{name} tokens/s per GPU ({'alone' if alone else 'mixed run'}, / "
            f"{'wall' if alone and several else 'exec'} time)",
            number(f.get(f"{m}_tokens_per_s_per_gpu")), f"{m}_tokens_per_s_per_gpu")
        row(f"{name} alone, tokens/s per GPU over wall", number(f.get(f"{m}_alone_tokens_per_s_per_gpu_wall")))
        row(f"{name} alone: prep | compute | execute s", _phases(f, f"{m}_alone_"))
    for m, name in MODEL_NAMES.items():
        row(f"mixed run {name}: tokens/s per GPU wall | exec",
            f"{number(f.get(f'{m}_tokens_per_s_per_gpu_wall'))} | {number(f.get(f'{m}_tokens_per_s_per_gpu_mixed'))}")
        row(f"mixed run {name}: busy | queue ms | compute ms",
            f"{number(f.get(f'{m}_busy_fraction'), '{:.0%}')} | "
            f"{number(f.get(f'{m}_queue_ms_per_request'), '{:,.0f}')} | "
            f"{number(f.get(f'{m}_compute_ms_per_request'), '{:,.0f}')}")
        row(f"mixed run {name}: prep | compute | execute s", _phases(f, f"{m}_"))
    row("GPU utilization, mean over embedding", number(f.get("gpu_util_mean"), "{:.1%}"), "gpu_util_mean")
    row("in-process ESM-2 tokens/s (ceiling)", number(f.get("inprocess_esm2_tokens_per_s")))
    row("in-process DNABERT-S tokens/s (ceiling)", number(f.get("inprocess_dnabert_s_tokens_per_s")))
    row("in-process frames/s (both models, 1 device)", number(f.get("inprocess_frames_per_s")))
    row("transformers SDPA ESM-2 tokens/s (baseline)", number(f.get("hf_esm2_tokens_per_s")))
    row("in-process / transformers (ESM-2)", number(f.get("inprocess_over_hf_esm2"), "{:.2f}x"))
    row("e2e per GPU / in-process", number(f.get("e2e_over_inprocess"), "{:.3f}"))
    row("Triton+client overhead (1 - e2e/in-process)", number(f.get("overhead"), "{:.1%}"), "overhead")
    row(f"1M reads, extrapolated ({gpus} GPU{'s' if gpus > 1 else ''})", number(f.get("reads_1m_s"), "{:,.0f} s"),
        "reads_1m_s")
    row("800k frames (the issue's 1M reads), extrapolated", number(f.get("frames_800k_s"), "{:,.0f} s"))
    for plan, p in (report.get("plans") or {}).items():   # e2e_fp8: the same passes under an fp8 plan
        for m, name in MODEL_NAMES.items():
            target = f"{m}_{plan}_tokens_per_s_per_gpu"
            row(f"{plan}: {name} tokens/s per GPU (alone) | x default",
                f"{number(f.get(target))} | {number(f.get(f'{m}_{plan}_over_default'), '{:.2f}x')}",
                target if target in t else None)
        row(f"{plan}: frames/s per GPU | 800k frames", f"{number(p.get('e2e_frames_per_s_per_gpu'))} | "
            f"{number(p.get('frames_800k_s'), '{:,.0f} s')}")
        row(f"{plan}: 1M reads, extrapolated", number(p.get("reads_1m_s"), "{:,.0f} s"),
            f"{plan}_reads_1m_s" if f"{plan}_reads_1m_s" in t else None)
        for m, name in MODEL_NAMES.items():
            c = (report.get("fp32_cosine") or {}).get(m, {})
            row(f"{plan}: {name} cosine vs fp32 min | mean",
                " | ".join(number(c.get(plan, {}).get(k), "{:.5f}") for k in ("min", "mean")))
    row("total vs one GPU (--one-gpu-json)", number(f.get("scaling_vs_one_gpu"), "{:.2f}x"), "scaling_vs_one_gpu")
    row("per-GPU token spread (max-min)/max", number(f.get("per_gpu_token_spread"), "{:.1%}"),
        "per_gpu_token_spread")
    return lines


def table_notes(report: dict) -> List[str]:
    """The counts check, how to read the figures, cosines, per-GPU detail and the run's notes."""
    f = report["figures"]
    counts = report.get("counts", {})
    lines = ["counts (prepped = client in = client out = server): " + "; ".join(
        f"{m} {number(v.get('prepped'))} = {number(v.get('client_in'))} = {number(v.get('client_out'))} = "
        f"{number(v.get('server'))}" for m, v in counts.items())
        + f"  -> {'match' if report.get('counts_match') else 'MISMATCH'}"]
    lines.append("mixed run: both models' instances time-slice each GPU, so a model's exec time there includes the "
                 "other's kernels (a lower bound); alone: a client pass of that model only, the GPU to itself")
    lines.append("prep | compute | execute s: the server instances' embed_prep_seconds_total (decode + tokenize), "
                 "embed_compute_seconds_total (encoder call, to the rows on the host) and Triton's compute_infer "
                 "(execute, with its wait for a free in-flight slot), summed over instances; on a GPU compute "
                 "overlaps the next execute (the rows are awaited in the answering thread) and can pass execute")
    cos = report.get("cosine", {})
    if cos:
        lines.append("min cosine over the first rows: " + ", ".join(f"{k} {number(v, '{:.5f}')}"
                                                                     for k, v in cos.items()))
    for m, by_plan in (report.get("fp32_cosine") or {}).items():
        lines.append(f"{MODEL_NAMES[m]} vs fp32 per sequence (in process, PyTorch eager fp32, the checkpoint's weights): "
                     + "; ".join(f"{plan} min {c['min']:.5f} p01 {c['p01']:.5f} mean {c['mean']:.5f}, "
                                 f"{c['below_0.999']} of {c['sequences']} below 0.999" for plan, c in by_plan.items()))
    for plan, models in (report.get("fp8_gate") or {}).items():
        lines.append(f"fp8 gate at load ({plan}, server log): " + "; ".join(
            f"{MODEL_NAMES[m]} min {g['min_cosine']:.5f} mean {g['mean_cosine']:.5f} on {g['sequences']} "
            f"(threshold {g['threshold']}: {g['verdict']})" for m, g in models.items()))
    refusal = report.get("gate_refusal")
    if refusal:
        lines.append("fp8 gate on a checkpoint built to break it (demo ESM-2, outlier channels x1e5), default "
                     "threshold: " + refusal_text(refusal))
    if report.get("per_gpu_tokens") and f.get("send_s"):
        lines.append("tokens/s per GPU over the mixed run (embed_tokens_total): " + "; ".join(
            f"gpu {g}: " + ", ".join(f"{m} {v / f['send_s']:,.0f}" for m, v in d.items())
            for g, d in report["per_gpu_tokens"].items()))
    if len(report.get("util_per_gpu") or {}) > 1:
        lines.append("GPU utilization per GPU: " + ", ".join(
            f"{uuid[-8:]} {v:.0%}" for uuid, v in sorted(report["util_per_gpu"].items())))
    lines.extend(f"note: {note}" for note in report.get("notes", []))
    return lines


def refusal_text(result: dict) -> str:
    """e2e_fp8.gate_refusal's result in words: each plan's check on each checkpoint, and what the
    server did with the broken one (the run's log and the report's notes)."""
    return ("; ".join(f"{name}: " + ", ".join(f"{c['plan']} {c['min_cosine']:.5f} "
                                               f"{'passed' if c['passed'] else 'REFUSED'}" for c in checks)
                      for name, checks in result["checks"].items())
            + f"; embed-server on it: dtype fp8 {'REFUSED to load' if result['refused'] else 'NOT refused'}, "
            f"fp8-smooth {'served' if result['smooth_served'] else 'NOT served'}")


def print_table(report: dict) -> None:
    print("\n".join(table_header(report) + table_rows(report) + table_notes(report)), flush=True)
