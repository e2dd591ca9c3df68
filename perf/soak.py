"""A bounded soak: locust against embed-server for some minutes; no failures, the client's counts
equal to the server's, and the server's memory flat.

    python perf/soak.py --minutes 5 --out perf/results/soak.json     # its own CPU server on demo checkpoints
    python perf/soak.py --server 127.0.0.1:8001 --metrics-url http://127.0.0.1:8002/metrics --minutes 1

Without --server it writes demo checkpoints (`embed-export demo`), starts `embed-server --cpu` on free
ports of 127.0.0.1 and stops it at the end. Locust runs headless (perf/soak_user.py: perf/locustfile.py's
gRPC user, both models, a mix of request sizes and an occasional request of long sequences) for
--minutes with --users users, each at most --request-rate requests/s. Meanwhile the server's memory is
sampled every --sample-interval seconds: VmRSS (/proc/PID/status) of tritonserver and every process
under it (the Python backend's stubs), summed; shared memory mapped by several of them counts in each.
tritonserver is found under our own embed-server, else as the process listening on --server's port
(or --server-pid).

Checks, printed at the end (exit 0 only when all hold, 1 otherwise, 2 for a bad command line):
  failures        locust reported 0 failed requests, and the server's failure counters did not move
  counts          per model, the requests locust counted as succeeded == the server's
                  nv_inference_request_success delta, and the sequences in them == embed_sequences_total's
  memory flat     after a warm-up (the first --warmup-fraction of the run), the rest split into thirds by
                  time: the last third's median RSS <= the middle third's + --max-growth-mb and
                  + --max-growth-pct (both); the series' min/median/max and least-squares slope (MB/min)
                  are printed too
  server alive    tritonserver's processes still run and /metrics answers after the run
Traffic goes only to this host (127.0.0.1, localhost or ::1) and the run is bounded (--minutes <= 120,
--users <= 64); locust stops by itself (--run-time), and is killed if it overruns by 5 minutes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Optional

PERF = Path(__file__).resolve().parent
USER_FILE = PERF / "soak_user.py"
MODELS = ("esm2", "dnabert_s")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
MB = 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python perf/soak.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="length of the load (locust --run-time)")
    p.add_argument("--server", default="", help="gRPC host:port of a running server (default: start our own)")
    p.add_argument("--metrics-url", default="", help="its /metrics URL (needed with --server)")
    p.add_argument("--server-pid", type=int, default=0,
                   help="tritonserver's pid (default: under our embed-server, else the gRPC port's listener)")
    p.add_argument("--users", type=int, default=4, help="locust users (-u)")
    p.add_argument("--request-rate", type=float, default=1.0, help="requests/s per user, at most")
    p.add_argument("--sizes", default="1:3,8:4,32:2,128:1", help="sequences per request N:WEIGHT,...")
    p.add_argument("--long-fraction", type=float, default=0.05, help="fraction of requests with long sequences")
    p.add_argument("--esm2-weight", type=int, default=3, help="relative frequency of esm2 requests")
    p.add_argument("--dnabert-s-weight", type=int, default=1, help="relative frequency of dnabert_s requests")
    p.add_argument("--request-timeout", type=float, default=120.0, help="client timeout of one request, s")
    p.add_argument("--sample-interval", type=float, default=5.0, help="seconds between memory samples")
    p.add_argument("--warmup-fraction", type=float, default=0.2, help="first part of the run left out of the memory check")
    p.add_argument("--max-growth-mb", type=float, default=50.0, help="memory check: allowed growth, MB")
    p.add_argument("--max-growth-pct", type=float, default=5.0, help="memory check: allowed growth, percent")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds for our own server to be ready")
    p.add_argument("--out", type=Path, default=None, help="write the figures here (JSON)")
    p.add_argument("--keep-workdir", action="store_true", help="keep the work folder (locust's files, the server log)")
    return p


def check_args(args, parser) -> None:
    if not 0 < args.minutes <= 120:
        parser.error("--minutes must be in (0, 120]")
    if not 1 <= args.users <= 64:
        parser.error("--users must be 1..64")
    if not 0 < args.request_rate <= 100:
        parser.error("--request-rate must be in (0, 100]")
    if not 0 <= args.warmup_fraction < 0.9:
        parser.error("--warmup-fraction must be in [0, 0.9)")
    if args.server:
        if not args.metrics_url:
            parser.error("--server needs --metrics-url")
        if host_of(args.server) not in LOCAL_HOSTS:
            parser.error(f"--server {args.server}: the soak sends traffic to this host only (127.0.0.1)")
    if args.metrics_url and urllib.parse.urlsplit(args.metrics_url).hostname not in LOCAL_HOSTS + ("::1",):
        parser.error(f"--metrics-url {args.metrics_url}: this host only")


def host_of(address: str) -> str:
    return address.rsplit(":", 1)[0] if ":" in address else address


# --- the server's processes and memory -------------------------------------------------------

def children_map() -> dict:
    """{ppid: [pid, ...]} of every process now."""
    tree = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int, tree: Optional[dict] = None) -> list:
    """pid and every process under it."""
    tree = children_map() if tree is None else tree
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(tree.get(p, []))
    return found


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def status_kb(pid: int) -> dict:
    """VmRSS, RssAnon, RssFile, RssShmem of one process, kB ({} when it is gone)."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                values[key] = int(rest.split()[0])
    except OSError:
        return {}
    return values


def process_label(pid: int) -> str:
    """"tritonserver", or a stub's "<model>_<device>_<instance>" (its command line's 8th argument)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    name = comm(pid)
    if name.startswith("triton_python") and len(args) > 8:
        return f"stub {args[8].decode(errors='replace')}"
    return name or str(pid)


def find_tritonserver_under(pid: int) -> Optional[int]:
    for p in descendants(pid):
        if comm(p) == "tritonserver":
            return p
    return None


def listener_pid(port: int) -> Optional[int]:
    """The process listening on TCP `port` (IPv4 or IPv6), from /proc/net/tcp* and /proc/*/fd."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                    inodes.add(fields[9])
    holders = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(fd.path)
                    if target.startswith("socket:[") and target[8:-1] in inodes:
                        holders.add(int(entry.name))
                        break
    named = [p for p in holders if comm(p) == "tritonserver"]
    if named:
        return min(named)
    for p in holders:  # e.g. the gRPC proxy in embed-server: tritonserver is its child
        found = find_tritonserver_under(p)
        if found:
            return found
    return None


class MemorySampler(threading.Thread):
    """Every `interval` s: (seconds since start, summed VmRSS MB, RssAnon MB, process count)."""

    def __init__(self, root_pid: int, interval: float):
        super().__init__(daemon=True)
        self.root_pid, self.interval = root_pid, interval
        self.samples: list = []
        self.per_process: dict = {}  # pid -> [(t, VmRSS MB)]
        self.stopping = threading.Event()
        self.start_time = time.monotonic()

    def sample(self) -> None:
        rss = anon = 0
        pids = descendants(self.root_pid)
        alive = 0
        for p in pids:
            values = status_kb(p)
            if values:
                alive += 1
                rss += values.get("VmRSS", 0)
                anon += values.get("RssAnon", 0)
                self.per_process.setdefault(p, []).append(
                    (round(time.monotonic() - self.start_time, 2), round(values.get("VmRSS", 0) / 1024, 1)))
        self.samples.append((round(time.monotonic() - self.start_time, 2), round(rss / 1024, 1),
                             round(anon / 1024, 1), alive))

    def run(self) -> None:
        while not self.stopping.is_set():
            self.sample()
            self.stopping.wait(self.interval)

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        self.sample()


def least_squares_slope(points: list) -> float:
    """Slope of y over x (per x unit); 0 for fewer than two points."""
    if len(points) < 2:
        return 0.0
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def memory_verdict(samples: list, run_start: float, run_end: float, warmup_fraction: float,
                   max_growth_mb: float, max_growth_pct: float) -> dict:
    """The memory check on the samples taken while the load ran (see the module's doc)."""
    run = [(t, rss) for t, rss, *_ in samples if run_start <= t <= run_end]
    steady_from = run_start + warmup_fraction * (run_end - run_start)
    steady = [(t, rss) for t, rss in run if t >= steady_from]
    third = (run_end - steady_from) / 3
    middle = [rss for t, rss in steady if steady_from + third <= t < steady_from + 2 * third]
    last = [rss for t, rss in steady if t >= steady_from + 2 * third]
    result = {"samples_in_run": len(run), "samples_after_warmup": len(steady),
              "warmup_s": round(steady_from - run_start, 1)}
    if not run:
        return {**result, "ok": False, "why": "no memory samples during the run"}
    values = [rss for _, rss in run]
    result.update(run_min_mb=min(values), run_median_mb=statistics.median(values), run_max_mb=max(values),
                  first_mb=values[0], last_mb=values[-1])
    if len(middle) < 2 or len(last) < 2:
        return {**result, "ok": False, "why": "too few samples after the warm-up (a longer run or a shorter --sample-interval)"}
    steady_values = [rss for _, rss in steady]
    m2, m3 = statistics.median(middle), statistics.median(last)
    growth = m3 - m2
    bound = min(max_growth_mb, m2 * max_growth_pct / 100)
    result.update(
        steady_min_mb=min(steady_values), steady_median_mb=statistics.median(steady_values),
        steady_max_mb=max(steady_values),
        slope_mb_per_min=round(least_squares_slope([(t / 60, rss) for t, rss in steady]), 2),
        middle_third_median_mb=m2, last_third_median_mb=m3, growth_mb=round(growth, 1),
        growth_pct=round(100 * growth / m2, 2), allowed_growth_mb=round(bound, 1),
        ok=growth <= bound,
    )
    return result


# --- the server's counters -------------------------------------------------------------------

def scrape(metrics_url: str) -> dict:
    """{metric: Counter(model -> value)} for the counters the checks use, summed over labels."""
    from e2e_metrics import metric_samples   # perf/ is on sys.path (the script's folder)

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    wanted = ("nv_inference_request_success", "nv_inference_request_failure",
              "embed_sequences_total", "embed_failures_total", "embed_tokens_total")
    counts = {name: Counter() for name in wanted}
    for name, labels, value in metric_samples(text):
        if name in counts:
            counts[name][labels.get("model", "")] += value
    return counts


def delta(after: dict, before: dict) -> dict:
    return {name: {m: int(after[name][m] - before[name].get(m, 0)) for m in after[name]} for name in after}


def settled_scrape(metrics_url: str, before: dict, timeout_s: float = 15.0) -> dict:
    """The counters once two reads a second apart agree (the last completions have been counted)."""
    deadline = time.monotonic() + timeout_s
    previous = scrape(metrics_url)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        current = scrape(metrics_url)
        if current == previous:
            return current
        previous = current
    return previous


# --- our own server ----------------------------------------------------------------------------

def _die_with_parent() -> None:
    from embed_server.launcher import die_with_parent

    die_with_parent()


@contextlib.contextmanager
def own_server(workdir: Path, startup_timeout: float):
    """(grpc address, metrics URL, embed-server pid): `embed-server --cpu` on demo checkpoints."""
    from embed_server.launcher import free_ports

    repo = workdir / "model_repository"
    print(f"soak: demo checkpoints -> {repo}", flush=True)
    subprocess.run([sys.executable, "-m", "embed_export.cli", "demo", "--out", str(repo)], check=True,
                   stdout=subprocess.DEVNULL)
    http, grpc, metrics = free_ports(3)
    log = open(workdir / "embed-server.out", "w")
    command = [sys.executable, "-m", "embed_server.cli", "--model-repository", str(repo), "--cpu",
               "--address", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc),
               "--metrics-port", str(metrics), "--log-file", str(workdir / "tritonserver.log"),
               "--startup-timeout", str(startup_timeout)]
    print("soak: $ embed-server " + " ".join(command[3:]), flush=True)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               preexec_fn=_die_with_parent)
    try:
        deadline = time.monotonic() + startup_timeout + 30
        while "embed-server: ready" not in (workdir / "embed-server.out").read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("embed-server did not start:\n" + (workdir / "embed-server.out").read_text()[-3000:])
            time.sleep(0.5)
        yield f"127.0.0.1:{grpc}", f"http://127.0.0.1:{metrics}/metrics", process.pid
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


# --- the run -----------------------------------------------------------------------------------

def run_locust(args, grpc: str, workdir: Path) -> dict:
    seconds = max(1, round(args.minutes * 60))
    command = [
        sys.executable, "-m", "locust", "-f", str(USER_FILE), "--headless",
        "-u", str(args.users), "-r", str(args.users), "--run-time", f"{seconds}s",
        "--stop-timeout", str(int(args.request_timeout) + 10),  # in-flight requests finish and are reported
        "--host", grpc, "--request-rate", str(args.request_rate),
        "--esm2-weight", str(args.esm2_weight), "--dnabert-s-weight", str(args.dnabert_s_weight),
        "--request-timeout", str(args.request_timeout),
        "--soak-sizes", args.sizes, "--soak-long-fraction", str(args.long_fraction),
        "--soak-tally", str(workdir / "tally.json"), "--json-file", str(workdir / "locust_stats"),
        "--only-summary", "--loglevel", "WARNING",
    ]
    print(f"soak: locust, {args.users} users x <= {args.request_rate:g} requests/s, {seconds} s, against {grpc}",
          flush=True)
    with open(workdir / "locust.out", "w") as out:
        # cwd: the work folder, so no stray locust.conf is read
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
                                   stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        try:
            code = process.wait(seconds + args.request_timeout + 300)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
    result = {"exit_code": code, "output_tail": (workdir / "locust.out").read_text()[-3000:]}
    with contextlib.suppress(OSError, ValueError):
        result["stats"] = json.loads((workdir / "locust_stats.json").read_text())
    with contextlib.suppress(OSError, ValueError):
        result["tally"] = json.loads((workdir / "tally.json").read_text())
    return result


def percentile(values: list, q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def soak(args, grpc: str, metrics_url: str, triton_pid: int, workdir: Path, front_pid: Optional[int]) -> dict:
    print(f"soak: tritonserver pid {triton_pid}, {len(descendants(triton_pid))} processes in its tree", flush=True)
    before = scrape(metrics_url)
    sampler = MemorySampler(triton_pid, args.sample_interval)
    sampler.start()
    front_rss = [status_kb(front_pid).get("VmRSS", 0) / 1024] if front_pid else []
    run_start = time.monotonic() - sampler.start_time
    locust = run_locust(args, grpc, workdir)
    run_end = time.monotonic() - sampler.start_time
    after = settled_scrape(metrics_url, before)
    sampler.stop()
    if front_pid:
        front_rss.append(status_kb(front_pid).get("VmRSS", 0) / 1024)
    alive = bool(status_kb(triton_pid))
    server = delta(after, before)

    tally = locust.get("tally", {}).get("models", {})
    stats = {s["name"]: s for s in locust.get("stats", [])}
    duration = run_end - run_start
    models = {}
    for m in MODELS:
        t = tally.get(m, {})
        s = stats.get(m, {})
        times = t.get("response_ms", [])
        models[m] = {
            "client_succeeded": t.get("succeeded", 0), "client_failed": t.get("failed", 0),
            "locust_requests": s.get("num_requests", 0), "locust_failures": s.get("num_failures", 0),
            "server_success": server["nv_inference_request_success"].get(m, 0),
            "server_failure": server["nv_inference_request_failure"].get(m, 0),
            "client_sequences": t.get("sequences", 0), "server_sequences": server["embed_sequences_total"].get(m, 0),
            "server_embed_failures": server["embed_failures_total"].get(m, 0),
            "server_tokens": server["embed_tokens_total"].get(m, 0), "client_letters": t.get("letters", 0),
            "p50_ms": percentile(times, 0.5), "p95_ms": percentile(times, 0.95), "max_ms": max(times, default=None),
            "errors": t.get("errors", {}),
        }
    succeeded = sum(v["client_succeeded"] for v in models.values())
    failures = sum(v["client_failed"] + v["locust_failures"] + v["server_failure"] + v["server_embed_failures"]
                   for v in models.values())
    counts_ok = all(
        v["client_succeeded"] > 0 and v["client_succeeded"] == v["server_success"] == v["locust_requests"]
        and v["client_sequences"] == v["server_sequences"] for v in models.values())
    labels = {p: process_label(p) for p in sampler.per_process}
    per_process = {}
    for p, series in sampler.per_process.items():
        run = [(t, r) for t, r in series if run_start <= t <= run_end]
        if run:
            per_process[f"{labels[p]} (pid {p})"] = {
                "first_mb": run[0][1], "last_mb": run[-1][1], "max_mb": max(r for _, r in run),
                "slope_mb_per_min": round(least_squares_slope(
                    [(t / 60, r) for t, r in run if t >= run_start + args.warmup_fraction * (run_end - run_start)]), 2)}
    memory = memory_verdict(sampler.samples, run_start, run_end, args.warmup_fraction, args.max_growth_mb,
                            args.max_growth_pct)
    try:
        scrape(metrics_url)
        answering = True
    except OSError:
        answering = False
    checks = {
        "locust ran and exited 0": locust["exit_code"] == 0 and "tally" in locust and "stats" in locust,
        "failures == 0": failures == 0,
        "counts equal (requests and sequences, per model)": counts_ok,
        "memory flat": bool(memory.get("ok")),
        "server alive after": alive and answering,
    }
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv else "",
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "server": {"grpc": grpc, "metrics_url": metrics_url, "own": front_pid is not None,
                   "processes": len(descendants(triton_pid)) if alive else 0},
        "duration_s": round(duration, 1),
        "requests_succeeded": succeeded,
        "requests_per_s": round(succeeded / duration, 2) if duration else 0.0,
        "sequences_per_s": round(sum(v["client_sequences"] for v in models.values()) / duration, 1) if duration else 0.0,
        "failures": failures,
        "models": models,
        "completions_per_10s": locust.get("tally", {}).get("completions_per_bucket", []),
        "memory": memory,
        "memory_per_process": per_process,
        "memory_samples": [{"t_s": t, "rss_mb": r, "anon_mb": a, "processes": n} for t, r, a, n in sampler.samples],
        "frontend_rss_mb": [round(x, 1) for x in front_rss],
        "locust_exit_code": locust["exit_code"],
        "checks": checks,
        "ok": all(checks.values()),
        **({} if locust["exit_code"] == 0 else {"locust_output_tail": locust["output_tail"]}),
    }


def report(result: dict) -> None:
    mem = result["memory"]
    print(f"\nsoak: {result['duration_s']:.0f} s, {result['requests_succeeded']:,} requests succeeded "
          f"({result['requests_per_s']:.2f}/s, {result['sequences_per_s']:.1f} sequences/s), "
          f"{result['failures']} failures")
    print(f"{'model':10s} {'client ok':>10s} {'server ok':>10s} {'client seqs':>12s} {'server seqs':>12s} "
          f"{'failed':>7s} {'p50 ms':>8s} {'p95 ms':>8s} {'max ms':>8s}")
    for m, v in result["models"].items():
        fmt = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
        print(f"{m:10s} {v['client_succeeded']:>10,d} {v['server_success']:>10,d} {v['client_sequences']:>12,d} "
              f"{v['server_sequences']:>12,d} {v['client_failed'] + v['server_failure']:>7d} "
              f"{fmt(v['p50_ms']):>8s} {fmt(v['p95_ms']):>8s} {fmt(v['max_ms']):>8s}")
        for error, n in list(v["errors"].items())[:5]:
            print(f"    {n} x {error}")
    if "run_min_mb" in mem:
        print(f"server RSS (tritonserver + stubs, {result['server']['processes']} processes), MB: run min "
              f"{mem['run_min_mb']:.0f} / median {mem['run_median_mb']:.0f} / max {mem['run_max_mb']:.0f} "
              f"(first {mem['first_mb']:.0f}, last {mem['last_mb']:.0f}; {mem['samples_in_run']} samples)")
    if "growth_mb" in mem:
        print(f"  after {mem['warmup_s']:.0f} s warm-up: min {mem['steady_min_mb']:.0f} / median "
              f"{mem['steady_median_mb']:.0f} / max {mem['steady_max_mb']:.0f}, slope "
              f"{mem['slope_mb_per_min']:+.2f} MB/min; median of the middle third {mem['middle_third_median_mb']:.0f}, "
              f"of the last third {mem['last_third_median_mb']:.0f}: {mem['growth_mb']:+.1f} MB "
              f"({mem['growth_pct']:+.2f}%), allowed {mem['allowed_growth_mb']:.0f} MB")
    for name, v in result.get("memory_per_process", {}).items():
        print(f"    {name:32s} first {v['first_mb']:6.0f}  last {v['last_mb']:6.0f}  max {v['max_mb']:6.0f} MB, "
              f"slope after warm-up {v['slope_mb_per_min']:+.1f} MB/min")
    if "why" in mem:
        print(f"  memory: {mem['why']}")
    for name, ok in result["checks"].items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")
    print(f"soak: {'PASSED' if result['ok'] else 'FAILED'}", flush=True)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    try:
        with contextlib.ExitStack() as stack:
            if args.server:
                grpc, metrics_url, front_pid = args.server, args.metrics_url, None
                port = int(args.server.rsplit(":", 1)[1])
                triton_pid = args.server_pid or listener_pid(port)
            else:
                grpc, metrics_url, front_pid = stack.enter_context(own_server(workdir, args.startup_timeout))
                triton_pid = args.server_pid or find_tritonserver_under(front_pid)
            if not triton_pid:
                print("soak: error: cannot find tritonserver's process (give --server-pid)", file=sys.stderr)
                return 2
            result = soak(args, grpc, metrics_url, triton_pid, workdir, front_pid)
    finally:
        if args.keep_workdir:
            print(f"soak: work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"soak: figures written to {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
