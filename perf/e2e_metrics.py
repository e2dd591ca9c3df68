"""perf/e2e.py's measurements of the server: /metrics sampled in a thread, Triton's per-model
statistics, and the figures of a client run computed from them."""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from typing import Dict, List, Optional

from e2e_common import MODELS, send_seconds

_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
COUNTERS = ("embed_tokens_total", "embed_sequences_total", "embed_forward_passes_total", "embed_failures_total",
            "embed_prep_seconds_total", "embed_compute_seconds_total")
NV_COUNTERS = ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count",
               "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
               "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
               "nv_inference_request_duration_us")
NV_COMPUTE = ("nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
              "nv_inference_compute_output_duration_us")


def metric_samples(text: str):
    """(name, {label: value}, float value) of each sample line of Prometheus text, as written."""
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        match = _LINE.match(line)
        if not match:
            continue
        try:
            value = float(match.group(4))
        except ValueError:
            continue
        yield match.group(1), dict(_LABEL.findall(match.group(3) or "")), value


def parse_metrics(text: str) -> dict:
    """Prometheus text -> {"embed": {metric: {(model, gpu): v}}, "nv": {metric: {model: v}},
    "util": {gpu_uuid: fraction}, "gpu_mem": {gpu_uuid: bytes}} (summed over other labels)."""
    out = {"embed": {m: {} for m in COUNTERS}, "nv": {m: {} for m in NV_COUNTERS}, "util": {}, "gpu_mem": {}}
    for name, labels, value in metric_samples(text):
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


def delta(first: dict, last: dict, group: str, metric: str) -> dict:
    """One parsed metric's change between two samples, per label key."""
    a, b = first[group][metric], last[group][metric]
    return {k: b.get(k, 0.0) - a.get(k, 0.0) for k in set(a) | set(b)}


def model_delta(first: dict, last: dict, metric: str, model: str) -> float:
    """One of our embed_* counters' change for one model, summed over GPUs and instances."""
    return sum(v for (m, _), v in delta(first, last, "embed", metric).items() if m == model)


def phase_seconds(first: dict, last: dict, model: str) -> dict:
    """{"prep": s, "compute": s} the model's instances counted between two samples
    (embed_prep_seconds_total, embed_compute_seconds_total, summed over instances and GPUs)."""
    return {name: model_delta(first, last, f"embed_{name}_seconds_total", model) for name in ("prep", "compute")}


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

    def abandon(self) -> None:
        """Ends the sampling loop without waiting for it (a failed run is being torn down)."""
        self._stop.set()


def embedding_window(samples: List[dict]) -> tuple:
    """(t_start, t_end) of the embedding phase from the sampled token counters: from the last sample
    before any token moved to the first sample holding the final counts."""
    totals = [sum(s["embed"]["embed_tokens_total"].values()) for s in samples]
    if len(samples) < 2 or totals[-1] <= totals[0]:
        return None, None
    start = max(i for i, v in enumerate(totals) if v <= totals[0])
    end = min(i for i, v in enumerate(totals) if v >= totals[-1])
    return samples[start]["t"], samples[end]["t"]


def model_figures(m: str, first: dict, last: dict, executed: dict, send_s: Optional[float], n_gpus: int,
                  instances: int) -> dict:
    """One model's figures of the mixed run: tokens, busy time, where its execute time went, and
    Triton's queue and compute time per request."""
    f: Dict[str, Optional[float]] = {}
    model_tokens = model_delta(first, last, "embed_tokens_total", m)
    f[f"{m}_tokens"] = int(model_tokens)
    f[f"{m}_sequences_server"] = int(model_delta(first, last, "embed_sequences_total", m))
    f[f"{m}_tokens_per_s_per_gpu_wall"] = model_tokens / send_s / n_gpus if send_s else None
    b = executed["busy"]   # summed over the model's instances (`instances` per GPU)
    f[f"{m}_busy_s"] = b
    f[f"{m}_busy_fraction"] = b / (send_s * n_gpus * instances) if b and send_s else None
    # Where the instances' execute time went: prep + compute (our counters) vs Triton's execute.
    phases = phase_seconds(first, last, m)
    f[f"{m}_server_prep_s"] = phases["prep"]
    f[f"{m}_server_compute_s"] = phases["compute"]
    f[f"{m}_server_execute_s"] = executed["execute"]
    # Both models' instances share each GPU, so an execution's time includes the other model's
    # kernels running beside it: a lower bound on the model alone (see e2e_passes.model_alone_pass).
    f[f"{m}_tokens_per_s_per_gpu_mixed"] = model_tokens / b if b else None
    f[f"{m}_tokens_per_s_per_gpu"] = f[f"{m}_tokens_per_s_per_gpu_mixed"]   # until its pass alone
    nv = {k: delta(first, last, "nv", k).get(m, 0.0) for k in NV_COUNTERS}
    requests = nv["nv_inference_request_success"] or None
    f[f"{m}_requests"] = int(nv["nv_inference_request_success"])
    f[f"{m}_executions"] = int(nv["nv_inference_exec_count"])
    queue = nv["nv_inference_queue_duration_us"]
    f[f"{m}_queue_ms_per_request"] = queue / 1e3 / requests if requests else None
    compute = sum(nv[k] for k in NV_COMPUTE)
    f[f"{m}_compute_ms_per_request"] = compute / 1e3 / requests if requests else None
    f[f"{m}_queue_fraction"] = queue / (queue + compute) if queue + compute else None
    return f


def utilization(samples: List[dict]) -> tuple:
    """(figures, window, {gpu_uuid: mean}) of nv_gpu_utilization over the embedding phase."""
    t_start, t_end = embedding_window(samples)
    in_window = [s for s in samples if t_start is not None and t_start <= s["t"] <= t_end]
    utils = [v for s in in_window for v in s["util"].values()]
    util_per_gpu = {}
    for s in in_window:
        for uuid, v in s["util"].items():
            util_per_gpu.setdefault(uuid, []).append(v)
    figures = {"gpu_util_mean": sum(utils) / len(utils) if utils else None, "gpu_util_samples": len(utils),
               "embedding_window_s": (t_end - t_start) if t_start is not None else None}
    return figures, [t_start, t_end], {uuid: sum(v) / len(v) for uuid, v in util_per_gpu.items()}


def token_spread(per_gpu: dict, gpus: list) -> dict:
    """(max - min) / max of each model's tokens per GPU, the worse model, and its complement."""
    spreads = []
    for m in MODELS:
        counts = [per_gpu[g][m] for g in gpus]
        if max(counts) > 0:
            spreads.append((max(counts) - min(counts)) / max(counts))
    return {"per_gpu_token_spread": max(spreads) if spreads else None,
            "per_gpu_token_balance": 1 - max(spreads) if spreads else None}


def server_figures(samples: List[dict], executed: Dict[str, dict], summary: dict, frames: int,
                   reads: int, client_s: float, instances: Optional[Dict[str, int]] = None) -> dict:
    """Figures of the Triton run (sampled counters, Triton statistics per model from exec_delta, the
    client's summary)."""
    first, last = samples[0], samples[-1]
    tokens = delta(first, last, "embed", "embed_tokens_total")
    gpus = sorted({gpu for (_, gpu), v in tokens.items() if v > 0}, key=lambda g: (len(g), g))
    n_gpus = max(1, len(gpus))
    send_s = send_seconds(summary)
    elapsed_s = float(summary.get("elapsed_s") or 0) or client_s
    f: Dict[str, Optional[float]] = {"gpus": n_gpus, "send_s": send_s, "client_elapsed_s": elapsed_s}
    per_gpu = {gpu: {m: int(tokens.get((m, gpu), 0)) for m in MODELS} for gpu in gpus}
    f["e2e_frames_per_s"] = frames / send_s if send_s else None
    f["e2e_frames_per_s_per_gpu"] = f["e2e_frames_per_s"] / n_gpus if send_s else None
    for m in MODELS:
        f.update(model_figures(m, first, last, executed[m], send_s, n_gpus, (instances or {}).get(m, 1)))
    util_figures, window, util_per_gpu = utilization(samples)
    f.update(util_figures)
    f["reads_1m_s"] = elapsed_s * 1e6 / reads if reads else None
    # The reading of a 1M-read sample, ~800k frames; this sample gives ~1.34 frames per
    # read, so reads_1m_s stands for ~1.34M frames. Both are shown; the target stays on reads.
    f["frames_800k_s"] = elapsed_s * 800_000 / frames if frames else None
    if len(gpus) > 1:
        f.update(token_spread(per_gpu, gpus))
    return {"figures": f, "per_gpu_tokens": per_gpu, "window": window, "util_per_gpu": util_per_gpu}


def timeline(samples: List[dict]) -> list:
    """Per sample: t, cumulative tokens per "model/gpu", GPU utilization per uuid (for the JSON and PNG)."""
    return [{"t": round(s["t"], 3),
             "tokens": {f"{m}/{g}": int(v) for (m, g), v in sorted(s["embed"]["embed_tokens_total"].items())},
             "util": s["util"]} for s in samples]
