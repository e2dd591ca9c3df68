"""End-to-end scenario (issue 5): a synthetic sample through embed-server + embed-client, one command.

    python3 perf/e2e.py --out $OUT                       # GPU host: ESM-2 3B + DNABERT-S, real size, ~7-9 min
    python3 perf/e2e.py --small --out /tmp/e2e           # CPU: demo-size models, a few hundred reads, < 90 s

Steps, in one process tree:
 1. preflight: every module the parent, the client and the server's stub need; missing ones are
    named at once (exit 3) before anything slow starts;
 2. a synthetic sample shaped like the real workload (reads of 150-500 bp, 60% cut from stop-free
    codon runs at GC 0.56, which gives ~1.3 open frames per kept 300-bp chunk), plus the same
    frames computed here with the client's own VirNucPro prep;
 3. random checkpoints at the real sizes (ESM-2 3B, DNABERT-S), built on the GPU and written
    (ESM-2 as bf16 safetensors in the HF layout; DNABERT-S with embed_core's writer), then a model
    repository with exact embedding dims (embed_server.repository.assemble_repository);
 4. embed-server in a subprocess (PATH=$STUB_PATH:$PATH when set, so the Python stub sees numpy<2);
    /metrics and the per-model statistics are sampled every second in a thread;
 5. embed-client in a subprocess on the sample, its log in OUT (the mixed run: both models' instances
    time-slice each GPU), then once per model alone (DNABERT-S, then ESM-2: --models MODEL, each
    model's own speed through the server); the server is stopped after them;
 6. the same frames through the model core in-process (Embedder, both models, one GPU: the
    ceiling) and a subsample through transformers' EsmModel bf16 SDPA, length-sorted (the plain
    baseline);
 7. one table: frames/s; tokens/s per GPU per model, alone and in the mixed run (embed_tokens_total
    over each model's execution time from Triton's batch statistics, and over the wall time); GPU
    utilization (nv_gpu_utilization, mean over the embedding phase); queue vs compute per request;
    where the model instances spent their execute time (embed_prep_seconds_total,
    embed_compute_seconds_total vs Triton's compute_infer); the in-process ceiling; the transformers
    baseline; overhead = 1 - e2e/in-process; 1M reads extrapolated; PASS/FAIL against the targets.
    OUT gets e2e.json (every figure), a PNG of tokens/s per GPU over the run, and the client's and
    the server's logs.

Server knobs for experiments: --instances-per-gpu N (instance_group count of the GPU configs) and
--model-param MODEL:KEY=VALUE (a config parameter, e.g. dnabert_s:attention=flex; the in-process
baseline takes the RuntimeConfig choices among them too, so both sides run the same kernels).

Exit codes: 0 the run completed (targets PASS or FAIL are printed; --strict: 4 when one FAILs),
1 the run failed (server, client, counts), 2 usage, 3 a required module is missing.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Dict, List, Optional

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
)

CLIENT_REQUIRED = ("numpy", "dnaio", "xopen", "pyarrow", "grpc", "tritonclient.grpc.aio")
CLIENT_OPTIONAL = ("rich", "prometheus_client")      # live view / client-side progress rates only
PARENT_REQUIRED = ("numpy", "torch", "tokenizers", "safetensors", "embed_core", "embed_client", "embed_server")
STUB_CODE = ("import sys, numpy, torch, tokenizers, safetensors, embed_core, embed_server\n"
             "print(sys.version_info[0], sys.version_info[1], numpy.__version__, torch.__version__)")


def log(message: str) -> None:
    print(f"e2e: {message}", flush=True)


class Failure(Exception):
    """The scenario cannot go on; the message says why (and where the logs are)."""


# ---------------------------------------------------------------------------------- preflight


def missing_modules(names) -> List[str]:
    out = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError, or a broken install
            out.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})")
    return out


def ensure_packages_importable() -> Optional[str]:
    """Our packages for this process and the client subprocess: installed, or this checkout's folders.

    Returns a directory to put on the subprocesses' PYTHONPATH (symlinks embed_* -> folders), or None.
    """
    if all(importlib.util.find_spec(p) is not None for p in ("embed_core", "embed_client", "embed_server")):
        return None
    links = Path(tempfile.mkdtemp(prefix="e2e-pkgs-"))
    for name, folder in (("embed_core", "core"), ("embed_client", "client"), ("embed_server", "server")):
        os.symlink(ROOT / folder, links / name)
    sys.path.insert(0, str(links))
    return str(links)


def stub_python() -> str:
    """The python3 the server (and so the Python backend stub) runs with: $STUB_PATH's, else ours."""
    stub = os.environ.get("STUB_PATH")
    if stub:
        candidate = Path(stub) / "python3"
        if candidate.exists():
            return str(candidate)
    return sys.executable


def child_env(extra_path: Optional[str]) -> dict:
    """os.environ with `extra_path` (from ensure_packages_importable) first on PYTHONPATH."""
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = extra_path + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def server_env(extra_path: Optional[str], gpus: Optional[int]) -> dict:
    env = child_env(extra_path)
    if os.environ.get("STUB_PATH"):
        env["PATH"] = os.environ["STUB_PATH"] + os.pathsep + env.get("PATH", "")
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    return env


def preflight(args, extra_path: Optional[str]) -> dict:
    """Every module each part needs; raises Failure naming all that are missing (exit 3)."""
    problems = []
    parent = list(PARENT_REQUIRED)
    if not args.skip_baselines:
        parent.append("transformers")
    for part, names in (("client (python3)", CLIENT_REQUIRED), ("scenario (python3)", parent)):
        missing = missing_modules(names)
        if missing:
            problems.append(f"{part} is missing: " + ", ".join(missing))
    optional = [n for n in CLIENT_OPTIONAL if importlib.util.find_spec(n) is None]
    if importlib.util.find_spec("matplotlib") is None:
        optional.append("matplotlib (the PNG is drawn without text instead)")
    python = stub_python()
    env = server_env(extra_path, None)
    stub = subprocess.run([python, "-c", STUB_CODE], capture_output=True, text=True, env=env)
    stub_info = stub.stdout.split()
    if stub.returncode != 0:
        last = (stub.stderr.strip().splitlines() or ["?"])[-1]
        problems.append(f"server stub python {python} cannot import its modules: {last}")
    elif int(stub_info[2].split(".")[0]) >= 2:
        problems.append(f"server stub python {python} has numpy {stub_info[2]}; tritonserver 2.51 needs numpy<2 "
                        "(set STUB_PATH, see perf/on-device.sh)")
    if problems:
        raise Failure("preflight:\n  " + "\n  ".join(problems))
    import numpy
    import torch
    info = {"python": platform.python_version(), "numpy": numpy.__version__, "torch": torch.__version__,
            "stub_python": python, "stub_numpy": stub_info[2], "stub_torch": stub_info[3],
            "optional_missing": optional}
    bm = load_perf_module("bench_models")
    for name in ("transformers", "pyarrow", "tritonclient"):
        info[name] = bm.package_version(name)
    return info


# ---------------------------------------------------------------------------------- workload


def load_perf_module(name: str):
    """perf/<name>.py as a module (perf/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "perf" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def shaped_reads(n: int, seed: int, coding_fraction: float, coding_gc: float, min_len: int = 150,
                 max_len: int = 500, n_fraction: float = 0.01):
    """(id, sequence) reads of min_len..max_len bp: `coding_fraction` cut from stop-free codon runs
    drawn with base composition GC = coding_gc (either strand, any offset), the rest uniform random,
    a few with Ns. make_sample's generator with GC-biased codons: at GC 0.56 the other frames of a
    coding read are open more often, as in real genomes, and a kept 300-bp chunk has ~1.3 open frames
    (make_sample's uniform codons give ~1.16)."""
    import numpy as np
    ms = load_perf_module("make_sample")
    base = {ord("A"): (1 - coding_gc) / 2, ord("T"): (1 - coding_gc) / 2,
            ord("G"): coding_gc / 2, ord("C"): coding_gc / 2}
    weights = np.array([base[a] * base[b] * base[c] for a, b, c in ms._SENSE.tolist()])
    cdf = np.cumsum(weights / weights.sum())
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, n)
    coding = rng.random(n) < coding_fraction
    with_n = rng.random(n) < n_fraction
    for i in range(n):
        length = int(lengths[i])
        if coding[i]:
            picks = np.minimum(np.searchsorted(cdf, rng.random(length // 3 + 2)), len(cdf) - 1)
            codons = ms._SENSE[picks].tobytes()
            offset = int(rng.integers(0, 3))
            seq = codons[offset:offset + length]
            if rng.random() < 0.5:
                seq = seq.translate(ms._COMPLEMENT)[::-1]
        else:
            seq = ms._random(rng, length)
        if with_n[i]:
            seq = ms._add_ns(rng, seq)
        yield f"read{i}", seq.decode("ascii")


def build_workload(args, workdir: Path) -> tuple:
    """(sample path, DNABERT-S pass sample path, frames, workload figures): the sample file, the one
    the DNABERT-S-alone pass sends (the same reads --dnabert-copies times over, ids suffixed _cK),
    and the frames the client will send."""
    import numpy as np
    from embed_client.virnucpro import PrepStats, prepare
    ms = load_perf_module("make_sample")
    reads = list(shaped_reads(args.reads, args.seed, args.coding_fraction, args.coding_gc))
    sample = workdir / "sample.fasta.gz"
    ms.write_records(sample, reads)
    dna_sample = sample
    if args.dnabert_copies > 1:
        dna_sample = workdir / f"sample_x{args.dnabert_copies}.fasta.gz"
        copies = ((f"{rid}_c{k}", seq) for k in range(args.dnabert_copies) for rid, seq in reads)
        ms.write_records(dna_sample, copies)
    stats = PrepStats()
    frames = list(prepare(reads, args.chunk, stats=stats))
    residues = np.fromiter((len(f.protein) for f in frames), dtype=np.int64, count=len(frames))
    kept_chunks = stats.chunks - stats.chunks_without_frames
    workload = {
        "reads": args.reads, "bases": stats.bases, "chunk": args.chunk, "chunks": stats.chunks,
        "kept_chunks": kept_chunks, "frames": len(frames),
        "frames_per_read": len(frames) / max(1, args.reads),
        "frames_per_kept_chunk": len(frames) / max(1, kept_chunks),
        "residues_mean": float(residues.mean()) if len(frames) else 0.0,
        "residues_min": int(residues.min()) if len(frames) else 0,
        "residues_max": int(residues.max()) if len(frames) else 0,
        "esm2_tokens": int(residues.sum() + 2 * len(frames)),
        "coding_fraction": args.coding_fraction, "coding_gc": args.coding_gc, "seed": args.seed,
        "sample_bytes": sample.stat().st_size,
    }
    return sample, dna_sample, frames, workload


# ---------------------------------------------------------------------------------- checkpoints


def model_dims(small: bool) -> dict:
    bm = load_perf_module("bench_models")
    return {"esm2": dict(bm.ESM2_SMALL if small else bm.ESM2_3B),
            "dnabert_s": dict(bm.DNABERT_S_SMALL if small else bm.DNABERT_S_FULL)}


def build_model(kind: str, dims: dict, device, seed: int):
    """A random encoder at `dims`, built directly on `device` (fast at 3B), fp32, eval.
    The same seed on the same device gives the same weights (the server's = the in-process ones)."""
    import torch
    bm = load_perf_module("bench_models")
    if kind == "esm2":
        from embed_core.esm2 import ESM2, Esm2Config
        with torch.device(device):
            model = ESM2(Esm2Config(**dims))
        bm.random_init_(model, seed=seed, std=lambda name, p: 0.02)
    else:
        from embed_core.dnabert_s import DnabertS, DnabertSConfig
        with torch.device(device):
            model = DnabertS(DnabertSConfig(**dims))
        bm.random_init_(model, seed=seed, std=bm.dnabert_std)
    return model.eval()


def write_esm2_fast(model, out_dir: Path) -> Path:
    """The published HF ESM-2 layout (`esm.`-prefixed encoder tensors, config.json, vocab.txt) in the
    model's own dtype: bf16 halves what embed_core.esm2.write_hf_checkpoint (fp32 always, plus the
    unused lm_head/contact head) writes; load_esm2 reads it (it converts to fp32 and recomputes the
    rotary inv_freq, as it does for any checkpoint without one)."""
    from safetensors.torch import save_file
    from embed_core.esm2 import Esm2Tokenizer
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {f"esm.{name}": t.detach().to("cpu").contiguous()
             for name, t in model.state_dict().items() if not name.endswith("inv_freq")}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(model.config.to_hf_json(), indent=2, sort_keys=True) + "\n")
    (out_dir / "vocab.txt").write_text("\n".join(Esm2Tokenizer.TOKENS) + "\n")
    return out_dir


def write_checkpoints(args, dims: dict, device, workdir: Path) -> tuple:
    """(repository, {model: seconds to build and write}); the tokenizer.json lands in checkpoints/."""
    import torch
    from embed_core.dnabert_s import train_demo_tokenizer
    from embed_core.dnabert_s import write_hf_checkpoint as write_dnabert_s
    from embed_core.esm2 import write_hf_checkpoint as write_esm2_core
    from embed_server.repository import assemble_repository
    bm = load_perf_module("bench_models")
    seconds, paths = {}, {}
    t0 = time.perf_counter()
    model = build_model("esm2", dims["esm2"], device, args.seed)
    if device.type == "cuda":
        model.to(torch.bfloat16)   # the server computes in bf16 on this GPU: nothing lost, half the bytes
    if args.esm_writer == "core":
        paths["esm2"] = write_esm2_core(model, workdir / "checkpoints" / "esm2")
    else:
        paths["esm2"] = write_esm2_fast(model, workdir / "checkpoints" / "esm2")
    del model
    bm.free_memory(device)
    seconds["esm2"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokenizer_json = train_demo_tokenizer(workdir / "checkpoints" / "tokenizer.json",
                                          vocab_size=dims["dnabert_s"]["vocab_size"], seed=args.seed)
    model = build_model("dnabert_s", dims["dnabert_s"], device, args.seed + 1)
    paths["dnabert_s"] = write_dnabert_s(model, tokenizer_json, workdir / "checkpoints" / "dnabert_s",
                                         safetensors=True)
    del model
    bm.free_memory(device)
    seconds["dnabert_s"] = time.perf_counter() - t0
    # --small runs the CPU configs: there --instances-per-gpu sets the CPU instances, so the knob
    # is exercised by the smoke run too.
    repo = assemble_repository(workdir / "repository", paths, symlink=True,
                               embedding_dims={m: dims[m]["hidden_size"] for m in MODELS},
                               cpu_instances=(args.instances_per_gpu if isinstance(args.instances_per_gpu, int)
                                              else 1) if args.small else None,
                               gpu_instances=args.instances_per_gpu, parameters=args.model_params)
    return repo, seconds


# ---------------------------------------------------------------------------------- metrics

_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
COUNTERS = ("embed_tokens_total", "embed_sequences_total", "embed_forward_passes_total", "embed_failures_total",
            "embed_prep_seconds_total", "embed_compute_seconds_total")
NV_COUNTERS = ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count",
               "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
               "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
               "nv_inference_request_duration_us")


def parse_metrics(text: str) -> dict:
    """Prometheus text -> {"embed": {metric: {(model, gpu): v}}, "nv": {metric: {model: v}},
    "util": {gpu_uuid: fraction}, "gpu_mem": {gpu_uuid: bytes}} (summed over other labels)."""
    out = {"embed": {m: {} for m in COUNTERS}, "nv": {m: {} for m in NV_COUNTERS}, "util": {}, "gpu_mem": {}}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        match = _LINE.match(line)
        if not match:
            continue
        name, labels, value = match.group(1), dict(_LABEL.findall(match.group(3) or "")), match.group(4)
        try:
            value = float(value)
        except ValueError:
            continue
        if name in out["embed"]:
            key = (labels.get("model", "?"), labels.get("gpu", "?"))
            out["embed"][name][key] = out["embed"][name].get(key, 0.0) + value
        elif name in out["nv"]:
            model = labels.get("model", "?")
            out["nv"][name][model] = out["nv"][name].get(model, 0.0) + value
        elif name == "nv_gpu_utilization":
            out["util"][labels.get("gpu_uuid", "?")] = value
        elif name == "nv_gpu_memory_used_bytes":
            out["gpu_mem"][labels.get("gpu_uuid", "?")] = value
    return out


def http_get(url: str, timeout: float = 5.0) -> Optional[bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError):
        return None


def model_exec_seconds(http_url: str, model: str) -> Optional[dict]:
    """Seconds the model's instances spent executing, from Triton's batch_stats (one count per
    execution whatever its requests, summed over instances): {"busy": compute input + infer +
    output, "execute": compute infer alone, i.e. the Python model's execute call}, or None when
    unavailable."""
    body = http_get(f"{http_url}/v2/models/{model}/stats")
    if body is None:
        return None
    try:
        stats = json.loads(body)["model_stats"][0]
        ns = {k: sum(b[k]["ns"] for b in stats.get("batch_stats", []))
              for k in ("compute_input", "compute_infer", "compute_output")}
        return {"busy": sum(ns.values()) / 1e9, "execute": ns["compute_infer"] / 1e9}
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def exec_delta(before: Optional[dict], after: Optional[dict]) -> dict:
    """model_exec_seconds after - before, each None when either reading is missing."""
    if before is None or after is None:
        return {"busy": None, "execute": None}
    return {k: after[k] - before[k] for k in before}


def phase_seconds(first: dict, last: dict, model: str) -> dict:
    """{"prep": s, "compute": s} the model's instances counted between two samples
    (embed_prep_seconds_total, embed_compute_seconds_total, summed over instances and GPUs)."""
    return {name: sum(v for (m, _), v in _delta(first, last, "embed", f"embed_{name}_seconds_total").items()
                      if m == model)
            for name in ("prep", "compute")}


class Sampler:
    """Reads /metrics every `interval` s in a thread; keeps every sample (t relative to `t0`)."""

    def __init__(self, metrics_url: str, interval: float, t0: float):
        self.url, self.interval, self.t0 = metrics_url, interval, t0
        self.samples: List[dict] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="e2e-metrics", daemon=True)

    def sample(self) -> None:
        body = http_get(self.url, timeout=max(2.0, self.interval))
        now = time.monotonic() - self.t0
        if body is None:
            self.errors += 1
            return
        parsed = parse_metrics(body.decode("utf-8", errors="replace"))
        parsed["t"] = now
        self.samples.append(parsed)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> "Sampler":
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()


# ---------------------------------------------------------------------------------- server and client

class Server:
    """embed-server (embed_server.cli) in a subprocess, under the stub's python; stopped by SIGTERM."""

    def __init__(self, repo: Path, workdir: Path, out_dir: Path, cpu: bool, extra_path, gpus, timeout_s: float):
        from embed_server.launcher import die_with_parent, free_ports
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.log_path = out_dir / "e2e_tritonserver.log"
        self.stdout_path = out_dir / "e2e_embed_server.out"
        cmd = [stub_python(), "-m", "embed_server.cli", "--model-repository", str(repo),
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
               "--metrics-port", str(self.metrics_port), "--log-file", str(self.log_path),
               "--startup-timeout", str(timeout_s)]
        if cpu:
            cmd.append("--cpu")
        self.command = cmd
        self._out = open(self.stdout_path, "wb")
        self.process = subprocess.Popen(cmd, env=server_env(extra_path, gpus), stdin=subprocess.DEVNULL,
                                        stdout=self._out, stderr=subprocess.STDOUT, cwd=workdir,
                                        preexec_fn=die_with_parent)
        self.timeout_s = timeout_s

    def wait_ready(self) -> None:
        from embed_server.launcher import http_request
        deadline = time.monotonic() + self.timeout_s + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise Failure(f"embed-server exited with code {self.process.returncode} before it was ready:\n"
                              + tail(self.stdout_path, 25))
            status, _ = http_request(f"{self.http_url}/v2/health/ready", timeout=2)
            if status == 200 and "ready:" in self.stdout_path.read_text(errors="replace"):
                return
            time.sleep(0.5)
        raise Failure(f"embed-server not ready after {self.timeout_s:.0f} s:\n" + tail(self.log_path, 25))

    def stop(self) -> Optional[int]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._out.close()
        return self.process.returncode


def tail(path: Path, lines: int) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return f"({path}: not written)"
    return "\n".join(f"  | {line[:300]}" for line in text[-lines:])


def run_client(args, sample: Path, server: Server, workdir: Path, out_dir: Path, extra_path,
               models: tuple = MODELS, tag: str = "client") -> tuple:
    """(exit code, summary dict or {}, seconds, output dir): embed-client as a subprocess, its log in
    out_dir/e2e_<tag>.log."""
    from embed_server.launcher import die_with_parent
    client_out = workdir / f"{tag}_out"
    cmd = [sys.executable, "-m", "embed_client.cli", "--sample", str(sample), "--server", server.grpc_url,
           "--metrics-url", server.metrics_url, "--out", str(client_out), "--chunk", str(args.chunk),
           "--models", ",".join(models), "--progress", "plain", "--log-interval", "15"] + list(args.client_arg)
    env = child_env(extra_path)
    log_path = out_dir / f"e2e_{tag}.log"
    t0 = time.perf_counter()
    with open(log_path, "wb") as fh:
        fh.write((" ".join(cmd) + "\n").encode())
        fh.flush()
        code = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                              preexec_fn=die_with_parent).returncode
    seconds = time.perf_counter() - t0
    summary = {}
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads((client_out / "summary.json").read_text())
    return code, summary, seconds, client_out


def first_rows(parquet: Path, n: int):
    """The first n embeddings of a client Parquet file, [n, hidden] float32 (rows in frame order)."""
    import numpy as np
    import pyarrow.parquet as pq
    batch = next(pq.ParquetFile(str(parquet)).iter_batches(batch_size=n, columns=["embedding"]))
    column = batch.column(0)
    return np.asarray(column.values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(column), -1)


# ---------------------------------------------------------------------------------- figures from the run


def _delta(first: dict, last: dict, group: str, metric: str) -> dict:
    a, b = first[group][metric], last[group][metric]
    return {k: b.get(k, 0.0) - a.get(k, 0.0) for k in set(a) | set(b)}


def embedding_window(samples: List[dict]) -> tuple:
    """(t_start, t_end) of the embedding phase from the sampled token counters: from the last sample
    before any token moved to the first sample holding the final counts."""
    totals = [sum(s["embed"]["embed_tokens_total"].values()) for s in samples]
    if len(samples) < 2 or totals[-1] <= totals[0]:
        return None, None
    start = max(i for i, v in enumerate(totals) if v <= totals[0])
    end = min(i for i, v in enumerate(totals) if v >= totals[-1])
    return samples[start]["t"], samples[end]["t"]


def server_figures(samples: List[dict], executed: Dict[str, dict], summary: dict, frames: int,
                   reads: int, client_s: float, instances: Optional[Dict[str, int]] = None) -> dict:
    """Figures of the Triton run (sampled counters, Triton statistics per model from exec_delta, the
    client's summary)."""
    first, last = samples[0], samples[-1]
    tokens = _delta(first, last, "embed", "embed_tokens_total")
    sequences = _delta(first, last, "embed", "embed_sequences_total")
    gpus = sorted({gpu for (_, gpu), v in tokens.items() if v > 0}, key=lambda g: (len(g), g))
    n_gpus = max(1, len(gpus))
    send_s = float(summary.get("send_elapsed_s") or 0) or None
    elapsed_s = float(summary.get("elapsed_s") or 0) or client_s
    f: Dict[str, Optional[float]] = {"gpus": n_gpus, "send_s": send_s, "client_elapsed_s": elapsed_s}
    per_gpu = {gpu: {m: int(tokens.get((m, gpu), 0)) for m in MODELS} for gpu in gpus}
    f["e2e_frames_per_s"] = frames / send_s if send_s else None
    f["e2e_frames_per_s_per_gpu"] = f["e2e_frames_per_s"] / n_gpus if send_s else None
    for m in MODELS:
        model_tokens = sum(v for (model, _), v in tokens.items() if model == m)
        f[f"{m}_tokens"] = int(model_tokens)
        f[f"{m}_sequences_server"] = int(sum(v for (model, _), v in sequences.items() if model == m))
        f[f"{m}_tokens_per_s_per_gpu_wall"] = model_tokens / send_s / n_gpus if send_s else None
        b = executed[m]["busy"]   # summed over the model's instances (instances[m] per GPU)
        f[f"{m}_busy_s"] = b
        model_instances = (instances or {}).get(m, 1)
        f[f"{m}_busy_fraction"] = b / (send_s * n_gpus * model_instances) if b and send_s else None
        # Where the instances' execute time went: prep + compute (our counters) vs Triton's execute.
        phases = phase_seconds(first, last, m)
        f[f"{m}_server_prep_s"] = phases["prep"]
        f[f"{m}_server_compute_s"] = phases["compute"]
        f[f"{m}_server_execute_s"] = executed[m]["execute"]
        # Both models' instances share each GPU, so an execution's time includes the other model's
        # kernels running beside it: a lower bound on the model alone (see model_alone_pass).
        f[f"{m}_tokens_per_s_per_gpu_mixed"] = model_tokens / b if b else None
        f[f"{m}_tokens_per_s_per_gpu"] = f[f"{m}_tokens_per_s_per_gpu_mixed"]   # until its pass alone
        nv = {k: _delta(first, last, "nv", k).get(m, 0.0) for k in NV_COUNTERS}
        requests = nv["nv_inference_request_success"] or None
        f[f"{m}_requests"] = int(nv["nv_inference_request_success"])
        f[f"{m}_executions"] = int(nv["nv_inference_exec_count"])
        f[f"{m}_queue_ms_per_request"] = nv["nv_inference_queue_duration_us"] / 1e3 / requests if requests else None
        compute = sum(nv[k] for k in ("nv_inference_compute_input_duration_us",
                                      "nv_inference_compute_infer_duration_us",
                                      "nv_inference_compute_output_duration_us"))
        f[f"{m}_compute_ms_per_request"] = compute / 1e3 / requests if requests else None
        total = nv["nv_inference_queue_duration_us"] + compute
        f[f"{m}_queue_fraction"] = nv["nv_inference_queue_duration_us"] / total if total else None
    t_start, t_end = embedding_window(samples)
    in_window = [s for s in samples if t_start is not None and t_start <= s["t"] <= t_end]
    utils = [v for s in in_window for v in s["util"].values()]
    f["gpu_util_mean"] = sum(utils) / len(utils) if utils else None
    util_per_gpu = {}
    for s in in_window:
        for uuid, v in s["util"].items():
            util_per_gpu.setdefault(uuid, []).append(v)
    util_per_gpu = {uuid: sum(v) / len(v) for uuid, v in util_per_gpu.items()}
    f["gpu_util_samples"] = len(utils)
    f["embedding_window_s"] = (t_end - t_start) if t_start is not None else None
    f["reads_1m_s"] = elapsed_s * 1e6 / reads if reads else None
    # The reading of a 1M-read sample, ~800k frames; this sample gives ~1.34 frames per
    # read, so reads_1m_s stands for ~1.34M frames. Both are shown; the target stays on reads.
    f["frames_800k_s"] = elapsed_s * 800_000 / frames if frames else None
    if len(gpus) > 1:
        spreads = []
        for m in MODELS:
            counts = [per_gpu[g][m] for g in gpus]
            if max(counts) > 0:
                spreads.append((max(counts) - min(counts)) / max(counts))
        f["per_gpu_token_spread"] = max(spreads) if spreads else None
        f["per_gpu_token_balance"] = 1 - f["per_gpu_token_spread"] if spreads else None
    return {"figures": f, "per_gpu_tokens": per_gpu, "window": [t_start, t_end], "util_per_gpu": util_per_gpu}


def timeline(samples: List[dict]) -> list:
    """Per sample: t, cumulative tokens per "model/gpu", GPU utilization per uuid (for the JSON and PNG)."""
    return [{"t": round(s["t"], 3),
             "tokens": {f"{m}/{g}": int(v) for (m, g), v in sorted(s["embed"]["embed_tokens_total"].items())},
             "util": s["util"]} for s in samples]


def configured_instances(repo: Path, small: bool) -> Dict[str, int]:
    """{model: instances per GPU (CPU instances with --small)} as the assembled configs say."""
    from embed_server.repository import instance_count
    config = "configs/cpu.pbtxt" if small else "config.pbtxt"
    return {m: instance_count((repo / m / config).read_text()) for m in MODELS}


def instances_text(instances: Dict[str, int]) -> str:
    return ", ".join(f"{m} {n}" for m, n in instances.items()) or "-"


def model_alone_pass(model: str, args, sample: Path, server: Server, workdir: Path, out_dir: Path, extra_path,
                     n_gpus: int, instances: int = 1) -> dict:
    """One model alone through Triton (embed-client --models MODEL on `sample`), after the mixed run:
    there both models' instances time-slice each GPU, so a model's execution time includes the other
    model's kernels (nearly every DNABERT-S execution overlaps an ESM-2 one; DNABERT-S's kernels take
    ~3-6% of the GPU beside ESM-2). Here the model has the GPU to itself, through the whole server +
    client stack."""
    tag = f"client_{model}"
    before = http_get(server.metrics_url)
    exec0 = model_exec_seconds(server.http_url, model)
    rc, summary, seconds, _ = run_client(args, sample, server, workdir, out_dir, extra_path,
                                         models=(model,), tag=tag)
    exec1 = model_exec_seconds(server.http_url, model)
    after = http_get(server.metrics_url)
    if rc != 0 or before is None or after is None:
        raise Failure(f"the {MODEL_NAMES[model]} pass failed (embed-client exit {rc}, log "
                      f"{out_dir / f'e2e_{tag}.log'}):\n" + tail(out_dir / f"e2e_{tag}.log", 15))
    a, b = (parse_metrics(x.decode("utf-8", errors="replace")) for x in (before, after))
    tokens = sum(v for (m, _), v in _delta(a, b, "embed", "embed_tokens_total").items() if m == model)
    sequences = sum(v for (m, _), v in _delta(a, b, "embed", "embed_sequences_total").items() if m == model)
    executed = exec_delta(exec0, exec1)
    busy = executed["busy"]
    phases = phase_seconds(a, b, model)
    send_s = float(summary.get("send_elapsed_s") or 0) or None
    stages = summary.get("stages", {})
    return {"seconds": seconds, "send_s": send_s, "tokens": int(tokens), "busy_s": busy,
            "server_prep_s": phases["prep"], "server_compute_s": phases["compute"],
            "server_execute_s": executed["execute"],
            # Several instances per GPU execute at once: their busy times overlap, so wall time it is.
            "tokens_per_s_per_gpu": (tokens / busy if busy else None) if instances == 1
            else (tokens / send_s / n_gpus if send_s else None),
            "tokens_per_s_per_gpu_wall": tokens / send_s / n_gpus if send_s else None,
            "counts": {"client_in": stages.get("send", {}).get(model, {}).get("sequences_in"),
                       "client_out": stages.get("write", {}).get(model, {}).get("rows_final"),
                       "server": int(sequences)}}


# ---------------------------------------------------------------------------------- baselines


def inprocess_overrides(params: dict) -> dict:
    """The --model-param entries of one model that the in-process baseline takes too: those naming a
    RuntimeConfig field whose value is a name (attention, kernels, dtype, too_long; not device), looked
    up at run time so fields the core adds later pass through. Numeric ones (token_budget,
    max_length: "auto" or a number in the config) set the server only; an empty value means the
    default on both sides."""
    from embed_core.runtime import RuntimeConfig
    named = {f.name for f in dataclasses.fields(RuntimeConfig) if isinstance(f.default, str) and f.name != "device"}
    return {k: v for k, v in params.items() if k in named and v}


def model_params_problem(model_params: dict) -> Optional[str]:
    """Why the --model-param values cannot run (a key the model's configs lack, a value the core
    refuses), or None; checked before anything slow starts."""
    from embed_core.runtime import RuntimeConfig
    from embed_server.repository import check_parameters
    try:
        check_parameters(model_params, MODELS)
    except ValueError as e:
        return f"--model-param: {e}"
    for model, params in model_params.items():
        try:
            RuntimeConfig(**inprocess_overrides(params))
        except ValueError as e:
            return f"--model-param {model}: {e}"
    return None


def inprocess_baseline(args, dims: dict, device, frames: list, log_fn) -> dict:
    """The model core in-process on the same frames (both models, one device): Embedder with the
    server's runtime policy (dtype, token budget, compile), timed after its warm-up, tokenization
    included (the server tokenizes in execute too). Returns figures and the first rows per model."""
    import numpy as np
    from embed_core.dnabert_s import DnabertTokenizer
    from embed_core.esm2 import Esm2Tokenizer
    from embed_core.models import DEFAULT_MAX_LENGTH
    from embed_core.runtime import Embedder, RuntimeConfig
    bm = load_perf_module("bench_models")
    out = {"frames": len(frames), "models": {}}
    seeds = {"esm2": args.seed, "dnabert_s": args.seed + 1}
    tokenizers = {"esm2": lambda: Esm2Tokenizer(),
                  "dnabert_s": lambda: DnabertTokenizer.from_file(args.workdir_path / "checkpoints" / "tokenizer.json")}
    field = {"esm2": "protein", "dnabert_s": "nucleotide"}
    keep_model = None
    for m in MODELS:
        t0 = time.perf_counter()
        model = build_model(m, dims[m], device, seeds[m])
        overrides = inprocess_overrides(args.model_params.get(m, {}))   # the server's kernel choices
        embedder = Embedder(model, tokenizers[m](), RuntimeConfig(device=str(device),
                                                                  max_length=DEFAULT_MAX_LENGTH[m], **overrides))
        embedder.warmup()
        sequences = [getattr(f, field[m]) for f in frames]
        embedder.embed(sequences[:max(16, len(sequences) // 20)])   # warm: kernels for these lengths
        bm.sync(device)
        setup_s = time.perf_counter() - t0
        before = embedder.stats.as_dict()
        t0 = time.perf_counter()
        rows = embedder.embed(sequences)
        bm.sync(device)
        seconds = time.perf_counter() - t0
        after = embedder.stats.as_dict()
        tokens = after["tokens"] - before["tokens"]
        out["models"][m] = {"sequences": len(sequences), "tokens": int(tokens), "seconds": seconds,
                            "tokens_per_s": tokens / seconds, "setup_s": setup_s,
                            "token_budget": embedder.token_budget, "compiled": embedder.compiled,
                            "dtype": bm.name_of(embedder.dtype), "runtime_overrides": overrides,
                            "forward_passes": after["forward_passes"] - before["forward_passes"],
                            "finite": bool(np.isfinite(rows).all())}
        out.setdefault("rows", {})[m] = rows[:args.check_rows]
        log_fn(f"in-process {m}: {len(sequences):,} frames, {tokens:,} tokens in {seconds:.1f} s "
               f"= {tokens / seconds:,.0f} tokens/s (setup {setup_s:.0f} s, budget {embedder.token_budget})")
        embedder.close()
        if m == "esm2":
            keep_model = model   # its weights seed the transformers baseline
        del embedder
        if m != "esm2":
            del model
        bm.free_memory(device)
    total_s = sum(v["seconds"] for v in out["models"].values())
    out["frames_per_s"] = len(frames) / total_s
    return out, keep_model


def transformers_baseline(args, dims: dict, device, frames: list, ours, log_fn) -> dict:
    """transformers' EsmModel bf16 (fp32 on CPU) SDPA, length-sorted padded batches of <= 16,384 tokens:
    the plain fast path (bench_models' (b)), on `frames` (a prefix of the run's), with our weights."""
    import numpy as np
    import torch
    from embed_core.esm2 import Esm2Tokenizer
    from transformers import EsmModel
    bm = load_perf_module("bench_models")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    hf_config = bm.hf_esm_config(ours.config, dims["esm2"])
    bm.set_attention(None, hf_config, "sdpa")
    with torch.device(device):
        hf = EsmModel(hf_config, add_pooling_layer=False)
    hf.to(dtype)
    bm.copy_weights(ours, hf)
    hf.eval()
    attn = bm.set_attention(hf, hf_config, "sdpa")
    tokenizer = Esm2Tokenizer()
    work = [tokenizer.encode(f.protein) for f in frames]
    warm = work[:max(8, len(work) // 16)]
    forward = lambda ids, mask: hf(input_ids=ids, attention_mask=mask).last_hidden_state  # noqa: E731
    run = bm.padded_runner(forward, 1, (1, 1),
                           lambda w: bm.sorted_batches(np.array([len(t) for t in w]), 16384), device)
    setup_s = time.perf_counter() - t0
    result, rows = bm.measure(f"transformers EsmModel {bm.name_of(dtype)} {attn}, length-sorted",
                              run, work, warm, device)
    result["setup_s"] = setup_s
    result["rows"] = rows[:args.check_rows]
    log_fn(f"transformers ESM-2: {len(work):,} frames, {result['tokens']:,} tokens in {result['seconds']:.1f} s "
           f"= {result['tokens_per_s']:,.0f} tokens/s")
    del hf, run
    bm.free_memory(device)
    return result


def min_cosine(a, b) -> Optional[float]:
    import numpy as np
    if a is None or b is None or len(a) == 0 or a.shape != b.shape:
        return None
    a, b = a.astype(np.float64), b.astype(np.float64)
    num = (a * b).sum(1)
    return float((num / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)).min())


# ---------------------------------------------------------------------------------- targets, table, plot


def evaluate_targets(figures: dict, small: bool) -> dict:
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
        shown = {"overhead": "{:.0%}", "gpu_util_mean": "{:.0%}", "reads_1m_s": "{:,.0f} s",
                 "scaling_vs_one_gpu": "{:.2f}x", "per_gpu_token_spread": "{:.0%}"}.get(name, "{:,.0f}")
        out[name] = {"target": f"{op} {shown.format(value)}", "op": op, "threshold": value, "value": v,
                     "status": status}
    return out


def _n(v, fmt="{:,.0f}", none="-") -> str:
    return none if v is None else fmt.format(v)


def _phases(f: dict, prefix: str) -> str:
    """ "prep | compute | execute" seconds of one model's instances (figures <prefix>server_*_s)."""
    return " | ".join(_n(f.get(f"{prefix}server_{k}_s"), "{:,.2f}") for k in ("prep", "compute", "execute"))


def model_params_text(model_params: dict) -> str:
    """{model: {key: value}} as the MODEL:KEY=VALUE words of --model-param ("defaults" when none)."""
    words = [f"{m}:{k}={v}" for m, kv in sorted(model_params.items()) for k, v in kv.items()]
    return " ".join(words) or "defaults"


def print_table(report: dict) -> None:
    f, w, c = report["figures"], report["workload"], report["config"]
    ph = report["phases"]
    gpus = int(f.get("gpus") or 1)
    lines = [
        "",
        f"== e2e: {gpus} x {c['device']}, {w['reads']:,} reads -> {w['frames']:,} frames "
        f"({w['frames_per_kept_chunk']:.2f} per kept {w['chunk']}-bp chunk, residues {w['residues_min']}-"
        f"{w['residues_max']} mean {w['residues_mean']:.0f}), {c['models_desc']}",
        f"server: instances per GPU {instances_text(c.get('instances') or {})}; config parameters: "
        f"{model_params_text(c.get('model_params') or {})}",
        "phases (s): " + " | ".join(f"{k} {v:.0f}" for k, v in ph.items() if v is not None),
        f"{'figure':48} {'value':>18}   target",
    ]
    t = report["targets"]

    def row(label, value, target=None):
        status = ""
        if target:
            status = f"{t[target]['target']:>14}  {t[target]['status']}"
        lines.append(f"{label:48} {value:>18}   {status}")

    row("frames/s through Triton (total)", _n(f.get("e2e_frames_per_s")))
    row("frames/s per GPU", _n(f.get("e2e_frames_per_s_per_gpu")))
    for m, name in MODEL_NAMES.items():   # the target figure: the pass alone when it ran, else the mixed run
        alone = f.get(f"{m}_alone_tokens_per_s_per_gpu") is not None
        several = (c.get("instances") or {}).get(m, 1) > 1   # overlapping executions: wall time
        row(f"{name} tokens/s per GPU ({'alone' if alone else 'mixed run'}, / "
            f"{'wall' if alone and several else 'exec'} time)",
            _n(f.get(f"{m}_tokens_per_s_per_gpu")), f"{m}_tokens_per_s_per_gpu")
        row(f"{name} alone, tokens/s per GPU over wall", _n(f.get(f"{m}_alone_tokens_per_s_per_gpu_wall")))
        row(f"{name} alone: prep | compute | execute s", _phases(f, f"{m}_alone_"))
    for m, name in MODEL_NAMES.items():
        row(f"mixed run {name}: tokens/s per GPU wall | exec",
            f"{_n(f.get(f'{m}_tokens_per_s_per_gpu_wall'))} | {_n(f.get(f'{m}_tokens_per_s_per_gpu_mixed'))}")
        row(f"mixed run {name}: busy | queue ms | compute ms",
            f"{_n(f.get(f'{m}_busy_fraction'), '{:.0%}')} | {_n(f.get(f'{m}_queue_ms_per_request'), '{:,.0f}')} | "
            f"{_n(f.get(f'{m}_compute_ms_per_request'), '{:,.0f}')}")
        row(f"mixed run {name}: prep | compute | execute s", _phases(f, f"{m}_"))
    row("GPU utilization, mean over embedding", _n(f.get("gpu_util_mean"), "{:.1%}"), "gpu_util_mean")
    row("in-process ESM-2 tokens/s (ceiling)", _n(f.get("inprocess_esm2_tokens_per_s")))
    row("in-process DNABERT-S tokens/s (ceiling)", _n(f.get("inprocess_dnabert_s_tokens_per_s")))
    row("in-process frames/s (both models, 1 device)", _n(f.get("inprocess_frames_per_s")))
    row("transformers SDPA ESM-2 tokens/s (baseline)", _n(f.get("hf_esm2_tokens_per_s")))
    row("in-process / transformers (ESM-2)", _n(f.get("inprocess_over_hf_esm2"), "{:.2f}x"))
    row("e2e per GPU / in-process", _n(f.get("e2e_over_inprocess"), "{:.3f}"))
    row("Triton+client overhead (1 - e2e/in-process)", _n(f.get("overhead"), "{:.1%}"), "overhead")
    row(f"1M reads, extrapolated ({gpus} GPU{'s' if gpus > 1 else ''})", _n(f.get("reads_1m_s"), "{:,.0f} s"),
        "reads_1m_s")
    row("800k frames (the issue's 1M reads), extrapolated", _n(f.get("frames_800k_s"), "{:,.0f} s"))
    row("total vs one GPU (--one-gpu-json)", _n(f.get("scaling_vs_one_gpu"), "{:.2f}x"), "scaling_vs_one_gpu")
    row("per-GPU token spread (max-min)/max", _n(f.get("per_gpu_token_spread"), "{:.1%}"), "per_gpu_token_spread")
    counts = report.get("counts", {})
    lines.append("counts (prepped = client in = client out = server): " + "; ".join(
        f"{m} {_n(v.get('prepped'))} = {_n(v.get('client_in'))} = {_n(v.get('client_out'))} = "
        f"{_n(v.get('server'))}" for m, v in counts.items()) + f"  -> {'match' if report.get('counts_match') else 'MISMATCH'}")
    lines.append("mixed run: both models' instances time-slice each GPU, so a model's exec time there includes the "
                 "other's kernels (a lower bound); alone: a client pass of that model only, the GPU to itself")
    lines.append("prep | compute | execute s: the server instances' embed_prep_seconds_total (decode + tokenize), "
                 "embed_compute_seconds_total (encoder call, to the rows on the host) and Triton's compute_infer "
                 "(execute, with its wait for a free in-flight slot), summed over instances; on a GPU compute "
                 "overlaps the next execute (the rows are awaited in the answering thread) and can pass execute")
    cos = report.get("cosine", {})
    if cos:
        lines.append("min cosine over the first rows: " + ", ".join(f"{k} {_n(v, '{:.5f}')}" for k, v in cos.items()))
    if report.get("per_gpu_tokens") and f.get("send_s"):
        lines.append("tokens/s per GPU over the mixed run (embed_tokens_total): " + "; ".join(
            f"gpu {g}: " + ", ".join(f"{m} {v / f['send_s']:,.0f}" for m, v in d.items())
            for g, d in report["per_gpu_tokens"].items()))
    if len(report.get("util_per_gpu") or {}) > 1:
        lines.append("GPU utilization per GPU: " + ", ".join(
            f"{uuid[-8:]} {v:.0%}" for uuid, v in sorted(report["util_per_gpu"].items())))
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    print("\n".join(lines), flush=True)


PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def rate_series(tl: list) -> tuple:
    """(times, {gpu: tokens/s both models}, {"model/gpu": tokens/s}) between consecutive samples."""
    times, per_gpu, per_key = [], {}, {}
    for a, b in zip(tl, tl[1:]):
        dt = b["t"] - a["t"]
        if dt <= 0:
            continue
        times.append(b["t"])
        sums = {}
        for key in set(a["tokens"]) | set(b["tokens"]):
            r = (b["tokens"].get(key, 0) - a["tokens"].get(key, 0)) / dt
            per_key.setdefault(key, []).append(r)
            gpu = key.split("/", 1)[1]
            sums[gpu] = sums.get(gpu, 0.0) + r
        for gpu, r in sums.items():
            per_gpu.setdefault(gpu, []).append(r)
    return times, per_gpu, per_key


def write_plot(path: Path, tl: list, window, title: str) -> str:
    """PNG of tokens/s per GPU over the run (+ GPU utilization); matplotlib, else a plain raster."""
    times, per_gpu, per_key = rate_series(tl)
    util_t = [s["t"] for s in tl if s["util"]]
    utils = {}
    for s in tl:
        for uuid, v in s["util"].items():
            utils.setdefault(uuid, []).append(v)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        _raw_png(path, times, per_gpu)
        return "raster (matplotlib absent: lines only, colours in GPU order)"
    fig, ax = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for i, (gpu, series) in enumerate(sorted(per_gpu.items())):
        color = [c / 255 for c in PALETTE[i % len(PALETTE)]]
        ax[0].plot(times, series, color=color, lw=1.8, label=f"gpu {gpu} (both models)")
        for key, s in sorted(per_key.items()):
            if key.endswith(f"/{gpu}"):
                ax[0].plot(times, s, color=color, lw=0.9, ls="--" if key.startswith("esm2") else ":",
                           label=f"gpu {gpu} {key.split('/')[0]}")
    if window and window[0] is not None:
        for a in ax:
            a.axvspan(window[0], window[1], color="0.92", zorder=0)
    ax[0].set_ylabel("tokens/s (embed_tokens_total)")
    ax[0].set_title(title, fontsize=9)
    ax[0].legend(fontsize=7, ncol=2)
    ax[0].grid(alpha=0.3)
    for i, (uuid, series) in enumerate(sorted(utils.items())):
        ax[1].plot(util_t[:len(series)], [100 * v for v in series], lw=1.2, label=uuid[-8:])
    ax[1].set_ylabel("nv_gpu_utilization %")
    ax[1].set_xlabel("seconds since the client started")
    ax[1].set_ylim(0, 105)
    ax[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "matplotlib"


def _raw_png(path: Path, times: list, per_gpu: dict, width: int = 900, height: int = 400) -> None:
    """A plain RGB PNG: axes and one line per GPU (no text), written with zlib only."""
    pixels = bytearray(b"\xff" * (width * height * 3))
    margin = 30

    def put(x, y, color):
        if 0 <= x < width and 0 <= y < height:
            i = (y * width + x) * 3
            pixels[i:i + 3] = bytes(color)

    for x in range(margin, width - margin):
        put(x, height - margin, (0, 0, 0))
    for y in range(margin, height - margin):
        put(margin, y, (0, 0, 0))
    t_max = max(times) if times else 1.0
    v_max = max((max(s) for s in per_gpu.values() if s), default=1.0) or 1.0
    for k, (gpu, series) in enumerate(sorted(per_gpu.items())):
        color = PALETTE[k % len(PALETTE)]
        points = [(margin + int((t / t_max) * (width - 2 * margin - 1)),
                   height - margin - int((v / v_max) * (height - 2 * margin - 1))) for t, v in zip(times, series)]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            steps = max(abs(x1 - x0), abs(y1 - y0), 1)
            for s in range(steps + 1):
                put(x0 + (x1 - x0) * s // steps, y0 + (y1 - y0) * s // steps, color)
    raw = b"".join(b"\x00" + bytes(pixels[y * width * 3:(y + 1) * width * 3]) for y in range(height))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------- the run


def json_safe(obj):
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


def defaults(args) -> argparse.Namespace:
    if args.reads is None:
        args.reads = 300 if args.small else 60_000
    if args.hf_frames is None:
        args.hf_frames = 48 if args.small else 8000
    if args.check_rows is None:
        args.check_rows = 64 if args.small else 2000
    if args.interval is None:
        args.interval = 0.25 if args.small else 1.0
    args.model_params = {}
    for model, key, value in args.model_param:   # (model, key, value) from parse_model_param; last wins
        args.model_params.setdefault(model, {})[key] = value
    return args


def run(args) -> int:
    args = defaults(args)
    t_start = time.monotonic()
    json_path, out_dir = output_paths(args.out)
    report: dict = {"schema": SCHEMA, "status": "running", "argv": sys.argv[1:], "config": {}, "workload": {},
                    "phases": {}, "figures": dict.fromkeys(ALL_FIGURES), "targets": {}, "counts": {},
                    "notes": []}

    def save():
        json_path.write_text(json.dumps(json_safe(report), indent=1) + "\n")

    def phase(name, t0):
        report["phases"][name] = round(time.monotonic() - t0, 1)
        save()

    extra_path = ensure_packages_importable()
    try:
        report["config"]["software"] = preflight(args, extra_path)
    except Failure as e:
        print(f"e2e: {e}", file=sys.stderr, flush=True)
        report["status"] = "preflight failed"
        report["notes"].append(str(e))
        save()
        return 3
    problem = model_params_problem(args.model_params)
    if problem:
        print(f"e2e: usage: {problem}", file=sys.stderr, flush=True)
        report["status"] = "usage error"
        report["notes"].append(problem)
        save()
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="e2e-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args.workdir_path = workdir
    import torch
    logging_quiet()
    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda:0")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    dims = model_dims(args.small)
    report["config"].update({
        "device": device_name, "small": args.small, "gpus_visible": torch.cuda.device_count(),
        "gpus_requested": args.gpus, "dims": dims, "esm_writer": args.esm_writer,
        "client_args": list(args.client_arg), "workdir": str(workdir),
        "instances_per_gpu": args.instances_per_gpu, "model_params": args.model_params, "instances": {},
        "inprocess_overrides": {m: inprocess_overrides(args.model_params.get(m, {})) for m in MODELS},
        "models_desc": "demo-size models (CPU)" if args.small else "ESM-2 3B + DNABERT-S real size, random weights"})
    for m, params in sorted(args.model_params.items()):
        server_only = sorted(set(params) - set(report["config"]["inprocess_overrides"][m]))
        if server_only and not args.skip_baselines:
            report["notes"].append(f"{m}: {', '.join(server_only)} set on the server only; the in-process "
                                   "baseline keeps its defaults there")

    sw = report["config"]["software"]
    log(f"server: instances per GPU {args.instances_per_gpu or 'as configured'}; config parameters: "
        f"{model_params_text(args.model_params)}")
    log(f"{device_name + ' x' + str(torch.cuda.device_count()) if device.type == 'cuda' else 'CPU'}; python {sw['python']} torch "
        f"{sw['torch']} numpy {sw['numpy']}; stub numpy {sw['stub_numpy']}; transformers {sw['transformers']}; "
        f"pyarrow {sw['pyarrow']}; tritonclient {sw['tritonclient']}"
        + (f"; optional missing: {', '.join(sw['optional_missing'])}" if sw["optional_missing"] else ""))
    server = sampler = None
    code = 0
    try:
        t0 = time.monotonic()
        sample, dna_sample, frames, workload = build_workload(args, workdir)
        report["workload"] = workload
        phase("sample", t0)
        log(f"sample: {workload['reads']:,} reads -> {workload['frames']:,} frames "
            f"({workload['frames_per_kept_chunk']:.2f} per kept chunk), {workload['esm2_tokens']:,} ESM-2 tokens")

        t0 = time.monotonic()
        repo, ck_seconds = write_checkpoints(args, dims, device, workdir)
        instances = report["config"]["instances"] = configured_instances(repo, args.small)
        if any(n > 1 for n in instances.values()):
            report["notes"].append(f"instances per GPU {instances_text(instances)}: execution-time figures of a "
                                   "model with several (busy s, tokens/s per exec time, server execute s) sum "
                                   "instances that overlap on a GPU; its target figure is then tokens over wall time")
        report["config"]["checkpoint_seconds"] = ck_seconds
        phase("checkpoints", t0)
        log("checkpoints: " + ", ".join(f"{m} {s:.0f} s" for m, s in ck_seconds.items()) + f" -> {repo}")

        t0 = time.monotonic()
        server = Server(repo, workdir, out_dir, cpu=args.small or device.type != "cuda", extra_path=extra_path,
                        gpus=args.gpus, timeout_s=args.startup_timeout)
        server.wait_ready()
        phase("server_start", t0)
        log(f"server ready in {report['phases']['server_start']:.0f} s (log {server.log_path})")

        t0 = time.monotonic()
        exec0 = {m: model_exec_seconds(server.http_url, m) for m in MODELS}
        sampler = Sampler(server.metrics_url, args.interval, t0).start()
        rc, summary, client_s, client_out = run_client(args, sample, server, workdir, out_dir, extra_path)
        sampler.stop()
        exec1 = {m: model_exec_seconds(server.http_url, m) for m in MODELS}
        phase("client", t0)
        executed = {m: exec_delta(exec0[m], exec1[m]) for m in MODELS}
        if rc != 0:
            raise Failure(f"embed-client exited with code {rc} (log {out_dir / 'e2e_client.log'}):\n"
                          + tail(out_dir / "e2e_client.log", 20))
        log(f"client: {summary.get('status')} in {client_s:.0f} s (send {summary.get('send_elapsed_s', 0):.0f} s)")
        sf = server_figures(sampler.samples, executed, summary, len(frames), args.reads, client_s,
                            report["config"]["instances"])
        report["figures"].update(sf["figures"])
        report["per_gpu_tokens"] = sf["per_gpu_tokens"]
        report["window"] = sf["window"]
        report["util_per_gpu"] = sf["util_per_gpu"]
        report["timeline"] = timeline(sampler.samples)
        report["client_summary"] = {k: summary.get(k) for k in ("status", "elapsed_s", "send_elapsed_s", "throughput",
                                                                 "servers_detail")}
        send, write = summary.get("stages", {}).get("send", {}), summary.get("stages", {}).get("write", {})
        report["counts"] = {m: {"prepped": len(frames), "client_in": send.get(m, {}).get("sequences_in"),
                                "client_out": write.get(m, {}).get("rows_final"),
                                "server": report["figures"].get(f"{m}_sequences_server")} for m in MODELS}
        report["counts_match"] = all(len(set(v.values())) == 1 for v in report["counts"].values())
        e2e_rows = {m: first_rows(client_out / f"{m}.parquet", args.check_rows) for m in MODELS}
        save()
        # Each model alone through the same server: in the mixed run both models' instances time-slice
        # each GPU, so a model's execution time there includes the other's kernels. A model's target
        # figure is its pass alone when that ran, the mixed run's lower bound otherwise.
        for m, pass_sample, copies, skip in (("dnabert_s", dna_sample, args.dnabert_copies, args.skip_dnabert_pass),
                                             ("esm2", sample, 1, args.skip_esm2_pass)):
            if skip:
                continue
            t0 = time.monotonic()
            alone = model_alone_pass(m, args, pass_sample, server, workdir, out_dir, extra_path,
                                     int(report["figures"]["gpus"]), report["config"]["instances"].get(m, 1))
            phase(f"{m}_alone", t0)
            report[f"{m}_alone"] = alone
            f = report["figures"]
            f[f"{m}_tokens_per_s_per_gpu"] = alone["tokens_per_s_per_gpu"]
            for key in ("tokens_per_s_per_gpu", "tokens_per_s_per_gpu_wall", "server_prep_s", "server_compute_s",
                        "server_execute_s"):
                f[f"{m}_alone_{key}"] = alone[key]
            report["counts"][f"{m} alone"] = {"prepped": len(frames) * copies, **alone["counts"]}
            report["counts_match"] = all(len(set(v.values())) == 1 for v in report["counts"].values())
            log(f"{MODEL_NAMES[m]} alone: {alone['tokens']:,} tokens, send {alone['send_s'] or 0:.1f} s, "
                f"{_n(alone['tokens_per_s_per_gpu'])} tokens/s per GPU")
            save()
        t0 = time.monotonic()
        server.stop()
        server = None
        phase("server_stop", t0)

        if not args.skip_baselines:
            run_baselines(args, report, dims, device, frames, e2e_rows, t_start, phase, save)
        scaling(args, report)
        report["targets"] = evaluate_targets(report["figures"], args.small)
        report["status"] = "complete" if report["counts_match"] else "counts mismatch"
        if not report["counts_match"]:
            code = 1
        elif args.strict and any(t["status"] == "FAIL" for t in report["targets"].values()):
            code = 4
    except Failure as e:
        report["status"] = "failed"
        report["notes"].append(str(e).splitlines()[0])
        print(f"e2e: FAILED: {e}", file=sys.stderr, flush=True)
        code = 1
    except KeyboardInterrupt:
        report["status"] = "interrupted"
        code = 130
    except Exception as e:  # a bug or an environment problem: the figures so far are still saved
        import traceback
        report["status"] = "failed"
        report["notes"].append(f"{type(e).__name__}: {e}"[:500])
        print("e2e: FAILED with an unexpected error:\n" + "".join(traceback.format_exc(limit=-8))[-4000:],
              file=sys.stderr, flush=True)
        code = 1
    finally:
        if sampler is not None:
            sampler._stop.set()
        if server is not None:
            server.stop()
        report["phases"]["total"] = round(time.monotonic() - t_start, 1)
        if report.get("timeline"):
            png = out_dir / (json_path.stem + "_tokens_per_gpu.png")
            try:
                how = write_plot(png, report["timeline"], report.get("window"),
                                 f"{report['config'].get('models_desc')}: tokens/s per GPU (shaded: embedding phase)")
                report["plot"] = {"path": str(png), "how": how}
            except Exception as e:  # the figures matter more than the picture
                report["notes"].append(f"plot failed: {type(e).__name__}: {e}")
        save()
        if not args.keep_workdir and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if report["status"] in ("complete", "counts mismatch"):
        print_table(report)
    print(f"e2e: {report['status']}; wrote {json_path}" + (f", {report['plot']['path']}" if report.get("plot") else ""),
          flush=True)
    return code


def run_baselines(args, report: dict, dims: dict, device, frames: list, e2e_rows: dict, t_start: float,
                  phase, save) -> None:
    """The in-process ceiling and the transformers baseline, each shrunk (or skipped, with a note) to
    what the time left under --budget-s holds."""
    f, notes = report["figures"], report["notes"]
    left = args.budget_s - (time.monotonic() - t_start)
    if not args.small and left < 100:
        notes.append(f"baselines skipped: {left:.0f} s left of --budget-s {args.budget_s:.0f}")
        log(notes[-1])
        return
    t0 = time.monotonic()
    inproc, esm_model = inprocess_baseline(args, dims, device, budgeted_frames(args, report, frames, t_start), log)
    phase("in_process", t0)
    for m in MODELS:
        f[f"inprocess_{m}_tokens_per_s"] = inproc["models"][m]["tokens_per_s"]
    f["inprocess_frames_per_s"] = inproc["frames_per_s"]
    f["inprocess_frames"] = inproc["frames"]
    report["inprocess"] = {k: v for k, v in inproc.items() if k != "rows"}
    if f.get("e2e_frames_per_s_per_gpu"):
        f["e2e_over_inprocess"] = f["e2e_frames_per_s_per_gpu"] / f["inprocess_frames_per_s"]
        f["overhead"] = 1 - f["e2e_over_inprocess"]
    report["cosine"] = {f"{m} e2e~in-process": min_cosine(e2e_rows[m][:len(inproc["rows"][m])], inproc["rows"][m])
                        for m in MODELS}
    save()
    hf_frames = min(args.hf_frames, len(frames))
    left = args.budget_s - (time.monotonic() - t_start)
    if not args.small:   # room for its setup (~40 s), then frames at half our ESM-2 speed
        frame_tokens = report["workload"]["esm2_tokens"] / max(1, len(frames))
        fit = int(max(0.0, left - 40) * 0.5 * f["inprocess_esm2_tokens_per_s"] / frame_tokens)
        if fit < hf_frames:
            hf_frames = fit if fit >= 256 else 0
            notes.append(f"transformers baseline on {hf_frames:,} frames, not {args.hf_frames:,} "
                         f"({left:.0f} s left of --budget-s {args.budget_s:.0f})")
            log(notes[-1])
    if not hf_frames:
        return
    t0 = time.monotonic()
    hf = transformers_baseline(args, dims, device, frames[:hf_frames], esm_model, log)
    del esm_model
    phase("transformers", t0)
    f["hf_esm2_tokens_per_s"] = hf["tokens_per_s"]
    f["hf_esm2_frames"] = hf["sequences"]
    f["inprocess_over_hf_esm2"] = f["inprocess_esm2_tokens_per_s"] / hf["tokens_per_s"]
    n = min(len(hf["rows"]), len(inproc["rows"]["esm2"]))
    report["cosine"]["esm2 transformers~in-process"] = min_cosine(hf["rows"][:n], inproc["rows"]["esm2"][:n])
    report["transformers"] = {k: v for k, v in hf.items() if k != "rows"}


def budgeted_frames(args, report: dict, frames: list, t_start: float) -> list:
    """The frames for the in-process baseline: all of them (or --inprocess-frames), fewer when the time
    left under --budget-s would not hold them (estimated from the Triton run's own speed)."""
    n = len(frames) if not args.inprocess_frames else min(len(frames), args.inprocess_frames)
    f = report["figures"]
    left = args.budget_s - (time.monotonic() - t_start)
    per_frame = 1.0 / f["e2e_frames_per_s_per_gpu"] if f.get("e2e_frames_per_s_per_gpu") else None
    fixed = 30.0 if args.small else 150.0   # model builds, compilation, the transformers subsample
    if per_frame and not args.small and n * per_frame + fixed > left:
        fit = max(2000, int((left - fixed) / per_frame))
        if fit < n:
            report["notes"].append(f"in-process baseline on the first {fit:,} of {len(frames):,} frames "
                                   f"(--budget-s {args.budget_s:.0f}: {left:.0f} s left)")
            n = fit
    return frames[:n]


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


def logging_quiet() -> None:
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    import warnings
    warnings.filterwarnings("ignore", category=UserWarning)


def instance_counts(text: str):
    """--instances-per-gpu: N (every model) or MODEL=N[,MODEL=N] (those models; others as configured)."""
    if "=" not in text:
        return positive_int(text)
    counts = {}
    for part in text.split(","):
        model, _, value = part.partition("=")
        if model.strip() not in MODELS:
            raise argparse.ArgumentTypeError(f"unknown model {model.strip()!r} in {text!r} (models: {', '.join(MODELS)})")
        counts[model.strip()] = positive_int(value.strip())
    return counts


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def parse_model_param(text: str) -> tuple:
    """--model-param MODEL:KEY=VALUE -> (model, key, value); whether the key exists is checked in run()."""
    model, colon, setting = text.partition(":")
    key, equals, value = setting.partition("=")
    if not colon or not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"expected MODEL:KEY=VALUE (e.g. dnabert_s:attention=flex), got {text!r}")
    if model not in MODELS:
        raise argparse.ArgumentTypeError(f"model must be one of {', '.join(MODELS)}, got {model!r} in {text!r}")
    return model, key.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True,
                   help="output directory (writes e2e.json, e2e_tokens_per_gpu.png, logs) or a .json path")
    p.add_argument("--small", action="store_true",
                   help="demo-size models on CPU (server --cpu), a few hundred reads: the test's smoke run")
    p.add_argument("--reads", type=int, default=None, help="reads in the sample [60000; small 300]")
    p.add_argument("--chunk", type=int, choices=(300, 500), default=300, help="VirNucPro chunk length (bp)")
    p.add_argument("--seed", type=int, default=0, help="sample and weight seed")
    p.add_argument("--coding-fraction", type=float, default=0.6, help="reads cut from stop-free codon runs")
    p.add_argument("--coding-gc", type=float, default=0.56,
                   help="GC of the coding reads' codons (0.56: ~1.3 open frames per kept 300-bp chunk)")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs the server may use (CUDA_VISIBLE_DEVICES=0..N-1); default: every visible GPU")
    p.add_argument("--one-gpu-json", "--baseline-json", dest="one_gpu_json", type=Path, default=None,
                   help="e2e.json of a one-GPU run (or perf/baseline.json filled from one): on several GPUs, "
                   "total frames/s is compared with its figures.e2e_frames_per_s")
    p.add_argument("--skip-baselines", action="store_true", help="no in-process / transformers runs")
    p.add_argument("--skip-dnabert-pass", action="store_true",
                   help="no DNABERT-S-alone client pass (its target then uses the mixed run's lower bound)")
    p.add_argument("--skip-esm2-pass", action="store_true",
                   help="no ESM-2-alone client pass, a shorter run (it sends the sample's frames again, about "
                   "as long as the mixed run); ESM-2's target then uses the mixed run's lower bound")
    p.add_argument("--dnabert-copies", type=positive_int, default=1, metavar="K",
                   help="the DNABERT-S-alone pass sends the sample's reads K times (ids suffixed), so that it "
                   "lasts long enough to time the steady state rather than its ramp (40,000 reads: ~2.4 s "
                   "per copy on an H200)")
    p.add_argument("--inprocess-frames", type=int, default=0,
                   help="frames for the in-process baseline (0: all; fewer if --budget-s requires)")
    p.add_argument("--hf-frames", type=int, default=None, help="frames for the transformers baseline [8000; small 48]")
    p.add_argument("--check-rows", type=int, default=None,
                   help="first rows whose embeddings are compared across paths (cosine) [2000; small 64]")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="whole-command time budget: the in-process baseline shrinks to fit it")
    p.add_argument("--esm-writer", choices=("fast", "core"), default="fast",
                   help="ESM-2 checkpoint: fast = bf16 safetensors (model dtype), core = embed_core's fp32 writer")
    p.add_argument("--startup-timeout", type=float, default=420.0, help="seconds for the server to load both models")
    p.add_argument("--interval", type=float, default=None, help="seconds between /metrics samples [1; small 0.25]")
    p.add_argument("--instances-per-gpu", type=instance_counts, default=None, metavar="N|MODEL=N,...",
                   help="model instances per GPU (instance_group count of the GPU configs): N for every model, "
                   "or per model, e.g. dnabert_s=3 (with --small: CPU instances, N only) "
                   "[default: as model_repository/ configures them]")
    p.add_argument("--model-param", action="append", default=[], type=parse_model_param, metavar="MODEL:KEY=VALUE",
                   help="set a config parameter of a model, repeatable (e.g. dnabert_s:attention=flex); the "
                   "in-process baseline takes the RuntimeConfig choices among them (attention, kernels, dtype) too")
    p.add_argument("--client-arg", action="append", default=[],
                   help="extra embed-client argument, repeatable (e.g. --client-arg=--max-in-flight=16)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="scratch folder for the sample, checkpoints, repository, client output (default: a "
                   "temporary folder, removed at the end)")
    p.add_argument("--keep-workdir", action="store_true", help="keep the temporary scratch folder")
    p.add_argument("--strict", action="store_true", help="exit 4 when a target FAILs")
    return p


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
