"""Progress of a run: a rich live view on a terminal, plain log lines otherwise.

Shows records read, frames embedded (of the total, estimated until the prep has read the
whole input), sequences/s, tokens/s, ETA and, from every server's Prometheus `/metrics`,
tokens/s per GPU (the `embed_tokens_total` counter, labels {model, gpu, instance}, summed
per gpu; a CPU instance is labelled "cpu"). Metrics that cannot be read are shown as
unavailable and said once per URL (with the hint to pass --metrics-url); they never fail a run.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from embed_core.alphabets import FP8_GATE_METRIC

log = logging.getLogger("embed_client.progress")

TOKENS_METRIC = "embed_tokens_total"


@dataclass
class Counters:
    """What the run has done so far; written by the run, read by the display."""

    records_total: int = 0             # records the reader will yield (known after validation)
    records_read: int = 0              # records prepped so far
    frames_prepped: int = 0
    prep_done: bool = False
    frames_resumed: int = 0            # frames already finished by an earlier run
    sequences_done: Dict[str, int] = field(default_factory=dict)  # per model, this run
    tokens_done: int = 0               # estimated tokens (letters + 2) answered, this run
    started: float = field(default_factory=time.monotonic)

    @property
    def frames_total_estimate(self) -> Optional[int]:
        if self.prep_done:
            return self.frames_prepped
        if not self.records_read or not self.records_total:
            return None
        return round(self.frames_prepped * self.records_total / self.records_read)

    @property
    def frames_done(self) -> int:
        """Frames every model has answered (the slowest model decides)."""
        done = min(self.sequences_done.values()) if self.sequences_done else 0
        return self.frames_resumed + done


def parse_metrics_page(text: str) -> Tuple[Dict[str, float], Dict[str, dict]]:
    """One /metrics page: the sum of `embed_tokens_total` per `gpu` label, and the fp8 gate per
    model ({model: {"plan", "min_cosine"}}, the smallest over its instances) where a model runs an
    fp8 plan."""
    from prometheus_client.parser import text_string_to_metric_families

    tokens: Dict[str, float] = {}
    gate: Dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == TOKENS_METRIC:
                gpu = sample.labels.get("gpu", "?")
                tokens[gpu] = tokens.get(gpu, 0.0) + sample.value
            elif sample.name == FP8_GATE_METRIC:
                model = sample.labels.get("model", "?")
                if model not in gate or sample.value < gate[model]["min_cosine"]:
                    gate[model] = {"plan": sample.labels.get("plan", "?"), "min_cosine": sample.value}
    return tokens, gate


class MetricsPoller:
    """Reads each server's /metrics every `interval` s in a thread; keeps per-GPU tokens/s."""

    def __init__(self, urls: Sequence[str], interval: float = 2.0, timeout: float = 2.0):
        self.urls = list(urls)
        self.interval = interval
        self.timeout = timeout
        self._last: Dict[Tuple[str, str], Tuple[float, float]] = {}
        self._first: Dict[Tuple[str, str], Tuple[float, float]] = {}
        self.rates: Dict[Tuple[str, str], float] = {}
        self.unavailable: Dict[str, str] = {}
        self.fp8_gate: Dict[str, Dict[str, dict]] = {}   # metrics url -> the fp8 gate per model
        self._warned: set = set()      # URLs whose unavailability was said (once each)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._started = False

    def start(self) -> None:
        self._started = True
        if self.urls:
            self.poll()  # a baseline before the first requests
            self._thread = threading.Thread(target=self._loop, name="metrics", daemon=True)
            self._thread.start()

    def add(self, url: str) -> None:
        """A server that joined the run after the start (or a --resume's first server)."""
        self.urls.append(url)
        if self._started and self._thread is None and not self._stop.is_set():
            self.start()

    def remove(self, url: str) -> None:
        """A server that left the run: no longer polled (what it counted so far stays)."""
        self.urls = [u for u in self.urls if u != url]  # a new list: poll() may be iterating

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 1)
            self._thread = None
        if self.urls:
            self.poll()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        for url in self.urls:
            try:
                with urllib.request.urlopen(url, timeout=self.timeout) as response:
                    text = response.read().decode("utf-8", errors="replace")
                per_gpu, gate = parse_metrics_page(text)
            except Exception as e:  # a metrics endpoint is optional: note it, keep going
                if url not in self._warned:
                    self._warned.add(url)
                    log.warning("per-GPU figures unavailable: %s cannot be read (%s); give "
                                "--metrics-url for that server (embed-server --metrics-port)",
                                url, e)
                self.unavailable[url] = str(e)
                continue
            self.unavailable.pop(url, None)
            if gate:
                self.fp8_gate[url] = gate
            now = time.monotonic()
            for gpu, value in per_gpu.items():
                key = (url, gpu)
                if key in self._last:
                    t0, v0 = self._last[key]
                    if now > t0:
                        self.rates[key] = max(0.0, (value - v0) / (now - t0))
                self._last[key] = (now, value)
                self._first.setdefault(key, (now, value))

    def tokens_since_start(self) -> Dict[Tuple[str, str], float]:
        """Server-side tokens per (metrics url, gpu) since the poller started."""
        return {key: self._last[key][1] - self._first[key][1] for key in self._last}


def device_label(gpu: str) -> str:
    """How a figure's device is named: "gpu 0" for a GPU index, else the label ("cpu")."""
    return f"gpu {gpu}" if str(gpu).isdigit() else str(gpu)


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def _frames_total_text(snapshot: dict) -> str:
    """The frame total of a snapshot: "?" while unknown, "~N" while estimated."""
    if snapshot["frames_total"] is None:
        return "?"
    return ("~" if snapshot["estimated"] else "") + f"{snapshot['frames_total']:,}"


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """The run's display: `start()`, then `stop()`; reads `Counters` on its own schedule."""

    def __init__(self, counters: Counters, metrics: MetricsPoller, tty: bool,
                 interval: float = 10.0):
        self.counters = counters
        self.metrics = metrics
        self.tty = tty
        self.interval = interval
        self._live = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._rate = _Rate()

    # --------------------------------------------------------------- numbers

    def snapshot(self) -> dict:
        c = self.counters
        elapsed = max(1e-9, time.monotonic() - c.started)
        done = c.frames_done
        this_run = done - c.frames_resumed
        sequences = sum(c.sequences_done.values())
        frame_rate = self._rate.update(this_run)
        total = c.frames_total_estimate
        eta = None
        if total is not None and done >= total and c.prep_done:
            eta = 0.0
        elif total is not None and frame_rate > 0:
            eta = max(0.0, (total - done) / frame_rate)
        gpu_rates = {f"{_host(url)} {device_label(gpu)}": rate
                     for (url, gpu), rate in sorted(self.metrics.rates.items())}
        return {
            "records": c.records_read, "records_total": c.records_total,
            "frames": done, "frames_total": total, "estimated": not c.prep_done,
            "seq_per_s": sequences / elapsed, "tok_per_s": c.tokens_done / elapsed,
            "eta": eta, "gpus": gpu_rates, "elapsed": elapsed,
        }

    def line(self) -> str:
        s = self.snapshot()
        total = _frames_total_text(s)
        gpus = ", ".join(f"{name} {_si(rate)} tok/s" for name, rate in s["gpus"].items())
        text = (f"records {s['records']:,}/{s['records_total']:,}  frames {s['frames']:,}/{total}"
                f"  {s['seq_per_s']:.1f} seq/s  {_si(s['tok_per_s'])} tok/s"
                f"  elapsed {_duration(s['elapsed'])}  ETA {_duration(s['eta'])}")
        return text + (f"  [{gpus}]" if gpus else "")

    def render(self):
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        s = self.snapshot()
        grid = Table.grid(padding=(0, 2))
        total = s["frames_total"] or 0
        bar = ProgressBar(total=max(total, s["frames"], 1), completed=s["frames"], width=40)
        total_text = _frames_total_text(s)
        grid.add_row("frames", bar, f"{s['frames']:,}/{total_text}", f"ETA {_duration(s['eta'])}")
        grid.add_row("records", f"{s['records']:,}/{s['records_total']:,}",
                     f"{s['seq_per_s']:.1f} seq/s", f"{_si(s['tok_per_s'])} tok/s")
        gpus = Table.grid(padding=(0, 2))
        for name, rate in s["gpus"].items():
            gpus.add_row(name, f"{_si(rate)} tok/s")
        for url in self.metrics.unavailable:
            gpus.add_row(_host(url), "metrics unavailable")
        return Group(grid, gpus)

    # --------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.metrics.start()
        if self.tty:
            from rich.live import Live

            self._live = Live(get_renderable=self.render, refresh_per_second=2, transient=False)
            self._live.start()
        else:
            self._thread = threading.Thread(target=self._log_loop, name="progress", daemon=True)
            self._thread.start()

    def _log_loop(self) -> None:
        while not self._stop.wait(self.interval):
            log.info("%s", self.line())

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
            self._thread = None
        self.metrics.stop()
        if self._live is not None:
            self._live.update(self.render(), refresh=True)
            self._live.stop()
            self._live = None
        else:
            log.info("%s", self.line())


class _Rate:
    """Frames per second over roughly the last minute (for the ETA)."""

    def __init__(self, horizon: float = 60.0):
        self.horizon = horizon
        self.points: List[Tuple[float, int]] = []
        self._lock = threading.Lock()

    def update(self, value: int) -> float:
        now = time.monotonic()
        with self._lock:
            self.points.append((now, value))
            while len(self.points) > 2 and now - self.points[0][0] > self.horizon:
                self.points.pop(0)
            t0, v0 = self.points[0]
        return (value - v0) / (now - t0) if now - t0 > 0.5 else 0.0


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc or url
