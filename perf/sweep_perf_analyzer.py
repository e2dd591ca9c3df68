"""NVIDIA's perf_analyzer swept over our length buckets, both models, a few concurrency levels, against
embed-server on random-weight real-size checkpoints (built and started as perf/e2e.py does), with one
short table at the end: sequences/s, tokens/s, p50/p90/p99 latency, queue vs compute per request.

    source perf/on-device.sh && python3 perf/sweep_perf_analyzer.py --out $OUT     # one H200: ~4 min
    python perf/sweep_perf_analyzer.py --small --out /tmp/sweep                     # CPU smoke run, demo sizes
    python perf/sweep_perf_analyzer.py --grpc-url localhost:8001 --metrics-url http://localhost:8002/metrics --out DIR

Each (model, input file, concurrency) is one perf_analyzer run of exactly `--rounds` x concurrency
requests of `-b` sequences (`--request-count`: every request sent is measured, none between windows),
so its time is bounded and the server's own counters can be matched: a row says MISMATCH when Triton's
nv_inference_request_success moved by anything but the requests perf_analyzer reports, or a request
failed. tokens/s = perf_analyzer's sequences/s x the server's tokens per sequence in that run
(Δembed_tokens_total / Δembed_sequences_total); sequences/s = concurrency x b / mean latency (closed
loop: perf_analyzer's own Inferences/Second divides by a window that --request-count rounds up to
whole seconds, kept in the JSON as pa_sequences_per_s). Queue and compute are perf_analyzer's server-side
averages per request (Triton's statistics: a batched request counts its execution's whole compute).
The input files are perf/make_perf_inputs.py's (written into the scratch folder). perf_analyzer is
found by perf/perf_analyzer.py (bash perf/install_perf_analyzer.sh; on the GPU machines perf/on-device.sh
unpacks .dev/perf_analyzer.tar.xz).

Writes into --out: perf_analyzer_sweep.md (the table), .json (rows and config), .csv (every
perf_analyzer CSV row with model, input, batch and concurrency in front), .log (perf_analyzer's
output), and the server's logs (e2e_tritonserver.log, e2e_embed_server.out).
Exit 0 all rows OK, 1 a MISMATCH or a failed run, 3 perf_analyzer or a module missing.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODELS = ("esm2", "dnabert_s")
COUNTERS = ("nv_inference_request_success", "nv_inference_request_failure", "embed_sequences_total",
            "embed_tokens_total")
RESULT_FILES = ("perf_analyzer_sweep.md", "perf_analyzer_sweep.json", "perf_analyzer_sweep.csv",
                "perf_analyzer_sweep.log")


def log(message: str) -> None:
    print(f"sweep: {message}", flush=True)


def load(name: str):
    from e2e_common import load_perf_module
    return load_perf_module(name)


def ints(text: str) -> list:
    return [int(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--small", action="store_true", help="demo-size models on CPU (server --cpu), short runs")
    p.add_argument("--models", default=",".join(MODELS), help="models to sweep, comma-separated")
    p.add_argument("--batch", "-b", type=int, default=None, help="sequences per request [32; small 4]")
    p.add_argument("--concurrency", type=ints, default=None, help="requests in flight, comma-separated [4,16,64; small 1,2]")
    p.add_argument("--rounds", type=int, default=None,
                   help="requests per run = rounds x concurrency [8; small 4]")
    p.add_argument("--count", type=int, default=512, help="sequences per input file")
    p.add_argument("--no-mixed", action="store_true", help="only the length buckets, not the *_mixed files")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--grpc-url", default=None, help="a running server's gRPC host:port (no checkpoints, no server)")
    p.add_argument("--http-url", default=None, help="with --protocol http: a running server's HTTP host:port")
    p.add_argument("--metrics-url", default=None, help="with --grpc-url: that server's /metrics URL")
    p.add_argument("--seed", type=int, default=0, help="weight and input seed")
    p.add_argument("--budget-s", type=float, default=360.0,
                   help="whole command; runs that would start later are skipped, and said so")
    p.add_argument("--startup-timeout", type=float, default=420.0, help="seconds for the server to load both models")
    p.add_argument("--instances-per-gpu", default=None, metavar="N|MODEL=N,...",
                   help="as perf/e2e.py: instances of every model, or of those named")
    p.add_argument("--model-param", action="append", default=[], metavar="MODEL:KEY=VALUE",
                   help="as perf/e2e.py: a config parameter of one model, repeatable")
    p.add_argument("--workdir", type=Path, default=None, help="scratch (checkpoints, repository, inputs) [temporary]")
    return p


# ------------------------------------------------------------------------------------------ server

def start_server(args, workdir: Path, out: Path):
    """Random-weight checkpoints (real size; demo size with --small) and embed-server on them, as e2e does."""
    import torch
    from e2e_checkpoints import model_dims, write_checkpoints, write_repository
    from e2e_options import instance_counts, parse_model_param
    from e2e_server import Server
    from e2e_setup import ensure_packages_importable
    extra_path = ensure_packages_importable()
    device = torch.device("cuda:0" if torch.cuda.is_available() and not args.small else "cpu")
    params = {}
    for model, key, value in map(parse_model_param, args.model_param):
        params.setdefault(model, {})[key] = value
    ck_args = argparse.Namespace(seed=args.seed, esm_writer="fast", small=args.small, model_params=params,
                                 instances_per_gpu=instance_counts(args.instances_per_gpu)
                                 if args.instances_per_gpu else None)
    t0 = time.monotonic()
    dims = model_dims(args.small)
    paths, _ = write_checkpoints(ck_args, dims, device, workdir)
    repo = write_repository(ck_args, dims, paths, workdir / "repository", params)
    log(f"checkpoints ({'demo size' if args.small else 'real size'}, random weights) in "
        f"{time.monotonic() - t0:.0f} s -> {repo}")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t0 = time.monotonic()
    server = Server(repo, workdir, out, cpu=device.type != "cuda", extra_path=extra_path, gpus=None,
                    timeout_s=args.startup_timeout)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    log(f"server ready in {time.monotonic() - t0:.0f} s (gRPC {server.grpc_url}, log {server.log_path})")
    return server


def counters(metrics_url: str) -> dict:
    """{(counter, model): value} summed over the other labels."""
    from e2e_metrics import metric_samples
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    out = {}
    for name, labels, value in metric_samples(text):
        if name in COUNTERS and "model" in labels:
            out[(name, labels["model"])] = out.get((name, labels["model"]), 0.0) + value
    return out


# ------------------------------------------------------------------------------------------ runs

def number(row: dict, column: str):
    try:
        return float(row[column])
    except (KeyError, TypeError, ValueError):
        return None


def gpu_utilization(text) -> float:
    """perf_analyzer's 'Avg GPU Utilization' cell ('GPU-uuid:0.93;...'): the mean over GPUs, or None."""
    values = [float(v) for v in re.findall(r":([0-9.]+)", text or "")]
    return sum(values) / len(values) if values else None


def one_run(pa, args, model: str, path: Path, concurrency: int, urls: dict, csv_path: Path, logf, timeout: float) -> dict:
    requests = args.rounds * concurrency
    url = urls["grpc"] if args.protocol == "grpc" else urls["http"]
    command = pa.command(["-m", model, "-i", args.protocol, "-u", url, "--input-data", path, "-b", args.batch,
                          "--concurrency-range", concurrency, "--request-count", requests,
                          "-f", csv_path, "--verbose-csv", "--collect-metrics",
                          "--metrics-url", urls["metrics"].split("://", 1)[-1]])
    before = counters(urls["metrics"])
    t0 = time.monotonic()
    try:
        run = subprocess.run(command, env=pa.env, capture_output=True, text=True, timeout=timeout)
        code, output = run.returncode, run.stdout + run.stderr
    except subprocess.TimeoutExpired as e:
        code, output = "timeout", e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    seconds = time.monotonic() - t0
    time.sleep(0.3)   # Triton's statistics land a moment after the last answer at most
    after = counters(urls["metrics"])
    d = {name: after.get((name, model), 0.0) - before.get((name, model), 0.0) for name in COUNTERS}
    logf.write(f"\n===== {model} {path.name} b={args.batch} c={concurrency} requests={requests} "
               f"({seconds:.1f} s, exit {code})\n$ {' '.join(map(str, command))}\n{output}\n")
    logf.flush()
    row = {"model": model, "input": path.stem, "batch": args.batch, "concurrency": concurrency,
           "requests": requests, "seconds": round(seconds, 2), "exit": code,
           "server_success": int(d["nv_inference_request_success"]),
           "server_failure": int(d["nv_inference_request_failure"]),
           "tokens_per_sequence": (d["embed_tokens_total"] / d["embed_sequences_total"]
                                   if d["embed_sequences_total"] else None)}
    reported = re.search(r"Client:\s*\n\s*Request count: (\d+)", output)
    row["pa_requests"] = int(reported.group(1)) if reported else None
    pa_rows = list(csv.DictReader(csv_path.open())) if code == 0 and csv_path.exists() else []
    if pa_rows:
        r = pa_rows[-1]
        row["csv"] = r
        # perf_analyzer's own Inferences/Second divides by its window, which --request-count rounds up to
        # whole seconds: closed loop, c requests always in flight, so sequences/s = c x b / mean latency.
        avg_us = number(r, "Avg latency")
        seqs = concurrency * args.batch / (avg_us / 1e6) if avg_us else None
        row["pa_sequences_per_s"] = number(r, "Inferences/Second")
        queue = number(r, "Server Queue")
        compute = sum(number(r, c) or 0.0 for c in ("Server Compute Input", "Server Compute Infer",
                                                    "Server Compute Output"))
        row.update({
            "sequences_per_s": seqs,
            "tokens_per_s": seqs * row["tokens_per_sequence"] if seqs and row["tokens_per_sequence"] else None,
            "p50_ms": (number(r, "p50 latency") or 0) / 1e3, "p90_ms": (number(r, "p90 latency") or 0) / 1e3,
            "p99_ms": (number(r, "p99 latency") or 0) / 1e3, "avg_ms": (number(r, "Avg latency") or 0) / 1e3,
            "queue_ms": (queue or 0) / 1e3, "compute_ms": compute / 1e3,
            "queue_fraction": queue / (queue + compute) if queue is not None and queue + compute > 0 else None,
            "gpu_util": gpu_utilization(r.get("Avg GPU Utilization")),
        })
    row["ok"] = (code == 0 and bool(pa_rows) and row["pa_requests"] == requests
                 and row["server_success"] == requests and row["server_failure"] == 0)
    return row


def fmt(v, spec: str = "{:,.0f}") -> str:
    return "-" if v is None else spec.format(v)


def table(rows: list) -> str:
    head = ("| model | input | b | conc | seq/s | tokens/s | p50 ms | p90 ms | p99 ms | queue ms | compute ms "
            "| queue % | GPU util | check |")
    lines = [head, "|" + "---|" * 2 + "---:|" * 11 + "---|"]
    for r in rows:
        check = "OK" if r["ok"] else ("skipped" if r.get("skipped") else
                                      f"MISMATCH (sent {r.get('pa_requests')}/{r['requests']}, server "
                                      f"{r.get('server_success')} ok {r.get('server_failure')} failed, exit {r.get('exit')})")
        lines.append(
            f"| {r['model']} | {r['input'].replace(r['model'] + '_', '')} | {r['batch']} | {r['concurrency']} "
            f"| {fmt(r.get('sequences_per_s'))} | {fmt(r.get('tokens_per_s'))} | {fmt(r.get('p50_ms'), '{:,.1f}')} "
            f"| {fmt(r.get('p90_ms'), '{:,.1f}')} | {fmt(r.get('p99_ms'), '{:,.1f}')} "
            f"| {fmt(r.get('queue_ms'), '{:,.1f}')} | {fmt(r.get('compute_ms'), '{:,.1f}')} "
            f"| {fmt(r.get('queue_fraction') and 100 * r['queue_fraction'], '{:.0f}')} "
            f"| {fmt(r.get('gpu_util') and 100 * r['gpu_util'], '{:.0f}%')} | {check} |")
    return "\n".join(lines)


def write_results(out: Path, rows: list, config: dict) -> None:
    (out / "perf_analyzer_sweep.md").write_text(table(rows) + "\n")
    (out / "perf_analyzer_sweep.json").write_text(json.dumps(
        {"config": config, "rows": [{k: v for k, v in r.items() if k != "csv"} for r in rows]}, indent=1) + "\n")
    columns = []
    for r in rows:
        columns += [c for c in r.get("csv", {}) if c not in columns]
    with (out / "perf_analyzer_sweep.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", "input", "batch", "concurrency", "requests", "ok"] + columns)
        for r in rows:
            writer.writerow([r["model"], r["input"], r["batch"], r["concurrency"], r["requests"], r["ok"]]
                            + [r.get("csv", {}).get(c, "") for c in columns])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.monotonic()
    args.batch = args.batch or (4 if args.small else 32)
    args.concurrency = args.concurrency or ([1, 2] if args.small else [4, 16, 64])
    args.rounds = args.rounds or (4 if args.small else 8)
    models = [m for m in args.models.split(",") if m]
    if set(models) - set(MODELS) or args.batch < 1 or args.rounds < 1 or min(args.concurrency) < 1:
        print(f"sweep: usage: --models from {','.join(MODELS)}; -b, --rounds, --concurrency >= 1", file=sys.stderr)
        return 2
    if args.grpc_url and not args.metrics_url:
        print("sweep: usage: --grpc-url needs --metrics-url (the counters each row is checked against)", file=sys.stderr)
        return 2
    if args.protocol == "http" and args.grpc_url and not args.http_url:
        print("sweep: usage: --protocol http with --grpc-url needs --http-url", file=sys.stderr)
        return 2
    pa = load("perf_analyzer").locate()
    if not pa.ok:
        print(f"sweep: {pa.reason()}", file=sys.stderr)
        return 3
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sweep-pa-"))
    workdir.mkdir(parents=True, exist_ok=True)
    inputs = load("make_perf_inputs").write_inputs(workdir / "inputs", count=args.count, seed=args.seed)
    files = {m: [p for p in inputs if p.name.startswith(m + "_len_")
                 or (p.name == f"{m}_mixed.json" and not args.no_mixed)] for m in models}
    log(f"{load('perf_analyzer').version(pa)} at {pa.binary}; inputs {workdir / 'inputs'}")
    server = None
    if args.grpc_url:
        urls = {"grpc": args.grpc_url, "http": args.http_url, "metrics": args.metrics_url}
    else:
        try:
            server = start_server(args, workdir, out)
        except Exception as e:   # e2e's Failure, a load error: the logs are in --out
            print(f"sweep: the server did not start: {e}", file=sys.stderr)
            return 1
        urls = {"grpc": server.grpc_url, "http": server.http_url.split("://", 1)[1], "metrics": server.metrics_url}
    config = {"perf_analyzer": str(pa.binary), "batch": args.batch, "concurrency": args.concurrency,
              "rounds": args.rounds, "protocol": args.protocol, "small": args.small, "count": args.count,
              "instances_per_gpu": args.instances_per_gpu, "model_params": args.model_param, "urls": urls}
    rows = []
    try:
        with (out / "perf_analyzer_sweep.log").open("w") as logf:
            for model in models:
                # Warm-up, not reported: each model once at the highest concurrency on its mixed file.
                c = max(args.concurrency)
                one_run(pa, argparse.Namespace(**{**vars(args), "rounds": 1}), model, files[model][-1], c, urls,
                        workdir / f"warmup_{model}.csv", logf, timeout=max(30.0, args.budget_s / 4))
                for path in files[model]:
                    for c in args.concurrency:
                        left = args.budget_s - (time.monotonic() - t_start)
                        if left < 20:
                            rows.append({"model": model, "input": path.stem, "batch": args.batch, "concurrency": c,
                                         "requests": args.rounds * c, "ok": False, "skipped": True})
                            continue
                        row = one_run(pa, args, model, path, c, urls, workdir / f"{path.stem}_c{c}.csv", logf,
                                      timeout=left - 10)
                        rows.append(row)
                        log(f"{model} {path.stem} c={c}: {fmt(row.get('sequences_per_s'))} seq/s, "
                            f"{fmt(row.get('tokens_per_s'))} tokens/s, p99 {fmt(row.get('p99_ms'), '{:.1f}')} ms "
                            f"({row['seconds']:.0f} s){'' if row['ok'] else ' MISMATCH'}")
                        write_results(out, rows, config)
    finally:
        if server is not None:
            server.stop()
    write_results(out, rows, config)
    skipped = sum(1 for r in rows if r.get("skipped"))
    title = (f"perf_analyzer sweep: {', '.join(models)}, -b {args.batch}, {args.rounds} x concurrency requests per "
             f"run, {args.protocol}; {'demo-size models on CPU' if args.small else 'real-size random weights'}")
    print(f"\n{title}\n\n{table(rows)}\n")
    if skipped:
        print(f"{skipped} run(s) skipped: --budget-s {args.budget_s:.0f} reached")
    print(f"whole command {time.monotonic() - t_start:.0f} s; results in {out}/{{{','.join(RESULT_FILES)}}}")
    return 0 if all(r["ok"] for r in rows if not r.get("skipped")) and rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
