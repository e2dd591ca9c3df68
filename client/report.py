"""What a run did, for people and for --resume: summary.json, skipped.tsv and rejected.tsv.

summary.json counts every stage (records read and skipped, frames prepped, sequences sent
and received per model, rows committed and final) and says whether the run is complete; a
--resume reads it to recognise a finished run. skipped.tsv lists the input records skipped
under --skip-bad-records, rejected.tsv the frames a server rejected.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence

from embed_core.alphabets import ADDED_TOKENS_PER_SEQUENCE

from .options import RunOptions
from .progress import Counters, MetricsPoller, device_label
from .reader import ValidatedInput
from .servers import ServerPool
from .sink import SUMMARY_FILE, OutputDir
from .virnucpro import PrepStats, record_of

log = logging.getLogger("embed_client")

LISTED = 100                 # ids listed in the summary per problem kind (files hold them all)
SKIPPED_FILE = "skipped.tsv"
REJECTED_FILE = "rejected.tsv"


class Rejection(NamedTuple):
    """A frame a server refused to embed (INVALID_ARGUMENT), with the server's message."""

    model: str
    frame_id: str
    message: str


@dataclass
class Tally:
    """The run's counts per model and per block, written by the pipeline and the resume plan."""

    models: Sequence[str]
    sent: Dict[str, int] = field(default_factory=dict)       # frames sent, per model
    received: Dict[str, int] = field(default_factory=dict)   # embeddings received
    letters: Dict[str, int] = field(default_factory=dict)    # letters of the received frames
    reused: Dict[str, int] = field(default_factory=dict)     # rows an earlier run embedded
    rejected: List[Rejection] = field(default_factory=list)
    blocks_resumed: int = 0      # committed blocks with all their parts
    blocks_repaired: int = 0     # committed blocks with parts missing
    blocks_new: int = 0          # blocks computed by this run from scratch
    send_seconds: float = 0.0    # wall time of the streaming pipeline

    def __post_init__(self):
        for counts in (self.sent, self.received, self.letters, self.reused):
            counts.update({m: 0 for m in self.models})


@dataclass
class Report:
    """Writes the run's report files from the parts of the run that hold the counts."""

    options: RunOptions
    started: float               # time.monotonic() at the run's start
    tally: Tally
    counters: Counters
    validated: ValidatedInput
    prep: PrepStats
    out: OutputDir
    pool: ServerPool
    metrics: MetricsPoller

    def write(self, status: str, message: Optional[str],
              final_rows: Optional[Dict[str, int]] = None,
              predictions: Optional[Dict[str, int]] = None) -> dict:
        """Write summary.json; returns the summary (skipped.tsv is written by the caller:
        `write_after_error`, or a complete run before its checksums)."""
        summary = self.summary(status, message, final_rows, predictions)
        self.out.write_summary(summary)
        return summary

    def write_after_error(self, status: str, message: str) -> None:
        """The report of a failed run (skipped.tsv, summary.json); a failure to write it must
        not hide the run's error."""
        try:
            self.write_skipped()
            self.write(status, message)
        except OSError as e:
            log.error("could not write %s: %s", self.options.out / SUMMARY_FILE, e)

    def write_skipped(self) -> None:
        """skipped.tsv: every record --skip-bad-records left out, with its problem."""
        if not self.validated.skipped:
            return
        with open(self.options.out / SKIPPED_FILE, "w", encoding="utf-8") as fh:
            fh.write("file\trecord_id\tline\tproblem\n")
            for p in self.validated.skipped:
                fh.write(f"{p.file}\t{p.record or ''}\t{p.line or ''}\t{p.problem}\n")

    def write_rejected(self) -> None:
        """rejected.tsv: every frame a server rejected, with its record and the server's message."""
        if not self.tally.rejected:
            return
        with open(self.options.out / REJECTED_FILE, "w", encoding="utf-8") as fh:
            fh.write("model\trecord_id\tframe_id\tmessage\n")
            for model, frame_id, message in self.tally.rejected:
                fh.write(f"{model}\t{record_of(frame_id)}\t{frame_id}\t{message}\n")

    def summary(self, status: str, message: Optional[str],
                final_rows: Optional[Dict[str, int]] = None,
                predictions: Optional[Dict[str, int]] = None) -> dict:
        """summary.json's content: the run's status and counts per stage."""
        options, tally = self.options, self.tally
        summary = {
            "status": status,
            "message": message,
            "resumable": status != "complete",
            "sample": str(options.sample),
            "out": str(options.out),
            "chunk": options.chunk,
            "models": list(options.models),
            "servers": list(dict.fromkeys(s.spec.url for s in self.pool.contacted)),
            "resumed": {"blocks": tally.blocks_resumed, "frames": self.counters.frames_resumed,
                        "blocks_with_missing_parts": tally.blocks_repaired},
            "stages": self._stages(final_rows),
            "rejected": [{"model": m, "record_id": record_of(f), "frame_id": f, "message": msg}
                         for m, f, msg in tally.rejected[:LISTED]],
            "servers_detail": self._servers_detail(),
            "elapsed_s": round(time.monotonic() - self.started, 3),
            "send_elapsed_s": round(tally.send_seconds, 3),
            "throughput": self._throughput(),
        }
        if final_rows and "merged" in final_rows:
            summary["stages"]["write"]["merged"] = {"rows_final": final_rows["merged"]}
        if predictions is not None:
            summary["stages"]["classifier"] = predictions
        return summary

    def _servers_detail(self) -> dict:
        """What each server did, by URL (an address that left and came back: summed)."""
        detail: Dict[str, dict] = {}
        for s in self.pool.contacted:
            entry = detail.setdefault(s.spec.url, {"joined": False, "left": False, "requests": {},
                                                   "sequences": {}, "retries": 0,
                                                   "given_up": None})
            entry["joined"] = entry["joined"] or s in self.pool.joined
            entry["left"] = s.retired  # the latest one's
            for key in ("requests", "sequences"):
                for model, n in getattr(s.stats, key).items():
                    entry[key][model] = entry[key].get(model, 0) + n
            entry["retries"] += s.stats.retries
            entry["given_up"] = s.stats.given_up  # the latest one's
            # The plan each model runs there (its config's dtype) and, for an fp8 plan, what the
            # gate measured at load (the server's /metrics, when it could be read).
            entry["dtype"] = {m: info.dtype for m, info in s.models.items()}
            gate = self.metrics.fp8_gate.get(s.spec.metrics_url)
            if gate:
                entry["fp8_gate"] = gate
        return detail

    def _stages(self, final_rows: Optional[Dict[str, int]]) -> dict:
        """Counts in and out of each stage: read, prep, send, write."""
        models, tally, v, stats = self.options.models, self.tally, self.validated, self.prep
        committed = self.out.committed_rows(models)
        return {
            "read": {"records_in_file": v.n_records, "records_kept": v.n_kept,
                     "records_skipped": len(v.skipped),
                     "skipped": [str(p) for p in v.skipped[:LISTED]],
                     "records_prepped": stats.records, "bases": stats.bases,
                     "records_with_u_read_as_t": getattr(v, "rna_records", 0)},
            "prep": {"chunks": stats.chunks, "frames": stats.frames,
                     "residues": stats.residues, "frames_with_stop": stats.frames_with_stop,
                     "empty_frames": stats.empty_frames,
                     "chunks_without_frames": stats.chunks_without_frames},
            "send": {m: {"sequences_in": stats.frames,
                         "already_done": tally.reused[m],
                         "sequences_sent": tally.sent[m],
                         "sequences_received": tally.received[m],
                         "rejected": sum(1 for r in tally.rejected if r.model == m),
                         "letters": tally.letters[m]} for m in models},
            "write": {m: {"rows_committed": committed.get(m, 0),
                          "rows_final": (final_rows or {}).get(m),
                          "hidden": self.pool.hidden.get(m)} for m in models},
        }

    def _throughput(self) -> dict:
        """Sequences and estimated tokens per second of sending, and the servers' own token counts."""
        tally = self.tally
        send_s = max(tally.send_seconds, 1e-9)
        sequences = sum(tally.received.values())
        tokens = sum(tally.letters[m] + ADDED_TOKENS_PER_SEQUENCE * tally.received[m]
                     for m in self.options.models)
        server_tokens = {f"{url} {device_label(gpu)}": int(n)
                         for (url, gpu), n in self.metrics.tokens_since_start().items()}
        return {"sequences_per_s": round(sequences / send_s, 2),
                "tokens_per_s": round(tokens / send_s, 1),
                "tokens_note": "client estimate: letters + 2 per sequence",
                "server_tokens": server_tokens}
