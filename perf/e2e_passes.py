"""perf/e2e.py's client passes through the running server: the mixed run (both models, as a user
runs it), then each model alone, and the counts that must match in every one of them."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from e2e_common import MODEL_NAMES, MODELS, Failure, Scenario, log, number, send_seconds, tail
from e2e_metrics import (Sampler, exec_delta, http_get, model_delta, model_exec_seconds, parse_metrics,
                         phase_seconds, server_figures, timeline)
from e2e_server import client_counts, first_rows, run_client

# Copied from the mixed run's figures to the report when a model's pass alone ran.
ALONE_FIGURES = ("tokens_per_s_per_gpu", "tokens_per_s_per_gpu_wall", "server_prep_s", "server_compute_s",
                 "server_execute_s")


def record_counts_match(report: dict) -> None:
    """Every pass's counts agree: frames prepped = client in = client out = server sequences."""
    report["counts_match"] = all(len(set(v.values())) == 1 for v in report["counts"].values())


def figures_of(s: Scenario, plan: Optional[str]) -> dict:
    """Where a pass's figures go: the report's own (the default plan) or report["plans"][plan] (an
    fp8 plan's passes, e2e_fp8.py)."""
    return s.report["figures"] if plan is None else s.report.setdefault("plans", {}).setdefault(plan, {})


def mixed_pass(s: Scenario, sample: Path, frames: list, plan: Optional[str] = None) -> dict:
    """The client phase: both models through the server, /metrics sampled throughout; the run's
    figures, timeline and counts in the report (`plan`: under report["plans"][plan], counts as
    "<model> <plan>"). Returns the first embeddings per model, for the cosines."""
    server, report = s.server, s.report
    tag = "client" if plan is None else f"client_{plan}"
    t0 = time.monotonic()
    exec0 = {m: model_exec_seconds(server.http_url, m) for m in MODELS}
    s.sampler = Sampler(server.metrics_url, s.args.interval, t0).start()
    rc, summary, client_s, client_out = run_client(s, sample, tag=tag)
    s.sampler.stop()
    exec1 = {m: model_exec_seconds(server.http_url, m) for m in MODELS}
    s.phase(tag, t0)
    executed = {m: exec_delta(exec0[m], exec1[m]) for m in MODELS}
    if rc != 0:
        raise Failure(f"embed-client exited with code {rc} (log {s.out_dir / f'e2e_{tag}.log'}):\n"
                      + tail(s.out_dir / f"e2e_{tag}.log", 20))
    log(f"client{'' if plan is None else f' ({plan})'}: {summary.get('status')} in {client_s:.0f} s "
        f"(send {summary.get('send_elapsed_s', 0):.0f} s)")
    sf = server_figures(s.sampler.samples, executed, summary, len(frames), s.args.reads, client_s,
                        report["config"]["instances"])
    figures = figures_of(s, plan)
    figures.update(sf["figures"])
    if plan is None:
        report["per_gpu_tokens"] = sf["per_gpu_tokens"]
        report["window"] = sf["window"]
        report["util_per_gpu"] = sf["util_per_gpu"]
        report["timeline"] = timeline(s.sampler.samples)
        report["client_summary"] = {k: summary.get(k) for k in ("status", "elapsed_s", "send_elapsed_s",
                                                                 "throughput", "servers_detail")}
    else:   # what the client's summary.json says each server ran, and its gate's figure
        report.setdefault("served", {})[plan] = {url: {k: d.get(k) for k in ("dtype", "fp8_gate")}
                                                 for url, d in summary.get("servers_detail", {}).items()}
    for m in MODELS:
        report["counts"][m if plan is None else f"{m} {plan}"] = {
            "prepped": len(frames), **client_counts(summary, m), "server": figures.get(f"{m}_sequences_server")}
    record_counts_match(report)
    e2e_rows = {m: first_rows(client_out / f"{m}.parquet", s.args.check_rows) for m in MODELS}
    s.save()
    return e2e_rows


def model_alone_pass(s: Scenario, model: str, sample: Path, n_gpus: int, instances: int = 1,
                     plan: Optional[str] = None) -> dict:
    """One model alone through Triton (embed-client --models MODEL on `sample`), after the mixed run:
    there both models' instances time-slice each GPU, so a model's execution time includes the other
    model's kernels (nearly every DNABERT-S execution overlaps an ESM-2 one). Here the model has the
    GPU to itself, through the whole server + client stack."""
    server, tag = s.server, f"client_{model}" + ("" if plan is None else f"_{plan}")
    before = http_get(server.metrics_url)
    exec0 = model_exec_seconds(server.http_url, model)
    rc, summary, seconds, _ = run_client(s, sample, models=(model,), tag=tag)
    exec1 = model_exec_seconds(server.http_url, model)
    after = http_get(server.metrics_url)
    if rc != 0 or before is None or after is None:
        raise Failure(f"the {MODEL_NAMES[model]} pass failed (embed-client exit {rc}, log "
                      f"{s.out_dir / f'e2e_{tag}.log'}):\n" + tail(s.out_dir / f"e2e_{tag}.log", 15))
    a, b = (parse_metrics(x.decode("utf-8", errors="replace")) for x in (before, after))
    tokens = model_delta(a, b, "embed_tokens_total", model)
    sequences = model_delta(a, b, "embed_sequences_total", model)
    executed = exec_delta(exec0, exec1)
    busy = executed["busy"]
    phases = phase_seconds(a, b, model)
    send_s = send_seconds(summary)
    return {"seconds": seconds, "send_s": send_s, "tokens": int(tokens), "busy_s": busy,
            "server_prep_s": phases["prep"], "server_compute_s": phases["compute"],
            "server_execute_s": executed["execute"],
            # Several instances per GPU execute at once: their busy times overlap, so wall time it is.
            "tokens_per_s_per_gpu": (tokens / busy if busy else None) if instances == 1
            else (tokens / send_s / n_gpus if send_s else None),
            "tokens_per_s_per_gpu_wall": tokens / send_s / n_gpus if send_s else None,
            "counts": {**client_counts(summary, model), "server": int(sequences)}}


def alone_passes(s: Scenario, sample: Path, dna_sample: Path, frames: list, plan: Optional[str] = None) -> None:
    """Each model alone through the same server (DNABERT-S, then ESM-2), unless skipped. A model's
    target figure is its pass alone when that ran, the mixed run's lower bound otherwise. `plan`: as
    mixed_pass's."""
    args, report = s.args, s.report
    suffix = "" if plan is None else f" {plan}"
    for m, pass_sample, copies, skip in (("dnabert_s", dna_sample, args.dnabert_copies, args.skip_dnabert_pass),
                                         ("esm2", sample, 1, args.skip_esm2_pass)):
        if skip:
            continue
        t0 = time.monotonic()
        alone = model_alone_pass(s, m, pass_sample, int(report["figures"]["gpus"]),
                                 report["config"]["instances"].get(m, 1), plan)
        s.phase(f"{m}_alone" + ("" if plan is None else f"_{plan}"), t0)
        if plan is None:
            report[f"{m}_alone"] = alone
        f = figures_of(s, plan)
        f[f"{m}_tokens_per_s_per_gpu"] = alone["tokens_per_s_per_gpu"]
        for key in ALONE_FIGURES:
            f[f"{m}_alone_{key}"] = alone[key]
        report["counts"][f"{m} alone{suffix}"] = {"prepped": len(frames) * copies, **alone["counts"]}
        record_counts_match(report)
        log(f"{MODEL_NAMES[m]} alone{suffix}: {alone['tokens']:,} tokens, send {alone['send_s'] or 0:.1f} s, "
            f"{number(alone['tokens_per_s_per_gpu'])} tokens/s per GPU")
        s.save()
