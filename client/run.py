"""One embed-client run: validate -> prep -> schedule -> send -> write -> summary.

`execute(options)` reads as the list above:
1. validate the whole input (nothing is sent when a record is bad, unless skip);
2. load the classifier, if any (its width is checked against the servers' models);
3. connect to every server, read the models' configs (max_batch_size, embedding width);
4. open the output directory, fresh or for --resume (committed blocks are skipped);
5. stream: reader -> VirNucPro prep -> blocks of `window` frames -> length-sorted requests
   -> the transport's shared queue -> embeddings -> one commit per finished block;
6. check counts in == counts out per model, write the final Parquet files (and the merged
   features and predictions), and the summary.
Every outcome after step 4 leaves summary.json saying what happened; only a run whose
counts all match is "complete".

--resume opens the output directory first and contacts no server until a block needs
computing: a run whose summary says complete and whose final files still hold that many
rows is done without reading the sample (only missing derived files, merged.parquet or the
predictions, are written from the final files); a run whose blocks are all committed is
finished from its parts; otherwise the servers are contacted at the first block to compute.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from . import reader
from .classifier import HIGHEST_FILE, PREDICTIONS_FILE, Classifier, PredictionWriter, load_classifier
from .errors import (ClassifierError, IncompleteError, InputError, InterruptedRun, OutputError, OutputWriteError,
                     ServerError, ServerUnavailableError)
from .progress import Counters, MetricsPoller, Progress
from .schedule import SPECIAL_TOKENS, Block, Item, Request, ScheduleConfig, blocks_of, cut_requests, interleave
from .sink import MERGE_ORDER, MERGED_FILE, SUMMARY_FILE, OutputDir, RunConfig, require_same_run
from .transport import Dispatcher, Server, ServerSpec, TransportConfig
from .virnucpro import PrepStats, prepare

log = logging.getLogger("embed_client")

MODELS = ("esm2", "dnabert_s")
# Letters per model token, for sizing requests: ESM-2 has one token per residue; DNABERT-S's
# BPE averages ~4-4.5 bp per token (reference/dnabert_s.md: 59 bp -> 15 tokens), so counting
# its letters as tokens made its requests ~4x smaller than the budget meant.
LETTERS_PER_TOKEN = {"esm2": 1.0, "dnabert_s": 4.0}
MODEL_INPUT = {"dnabert_s": "nucleotide", "esm2": "protein"}  # Frame field each model embeds
CHUNK_SIZES = (300, 500)
MAX_OPEN_BLOCKS = 6          # blocks in memory at once (bounds the embeddings held)
LISTED = 100                 # ids listed in the summary per problem kind (files hold them all)


@dataclass(frozen=True)
class RunOptions:
    """Everything one run needs; built by the CLI, usable from tests."""

    sample: Path
    servers: Tuple[ServerSpec, ...]
    out: Optional[Path] = None                 # None: <sample stem>_embeddings beside the sample
    chunk: int = 300
    models: Tuple[str, ...] = MODELS
    skip_bad_records: bool = False
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    resume: bool = False
    merged: bool = False
    classifier: Optional[Path] = None
    allow_pickle: bool = False
    tty: Optional[bool] = None                 # None: rich view when stdout is a terminal
    log_interval: float = 10.0

    def __post_init__(self):
        object.__setattr__(self, "sample", Path(self.sample))
        if self.out is None:
            object.__setattr__(self, "out", default_out(self.sample))
        object.__setattr__(self, "out", Path(self.out))
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise ValueError(f"models must be a non-empty subset of {MODELS}, got {self.models}")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models listed twice: {self.models}")
        # One canonical order (VirNucPro's: nucleotide first), whatever order was given.
        object.__setattr__(self, "models",
                           tuple(m for m in MERGE_ORDER if m in self.models))
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")
        if not self.servers:
            raise ValueError("at least one server is needed")
        if (self.merged or self.classifier) and set(self.models) != set(MERGE_ORDER):
            raise ValueError("--merged and --classifier need both models (--models "
                             "esm2,dnabert_s)")


@dataclass
class RunResult:
    """What a run did: its status, summary (also in summary.json) and output directory."""

    status: str
    out: Path
    summary: dict
    message: Optional[str] = None              # set when --resume found nothing to compute


def default_out(sample: Path) -> Path:
    """`<sample stem>_embeddings/` beside the sample (S1.fasta.gz -> S1_embeddings)."""
    name = sample.name
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for suffix in (".fasta", ".fas", ".fa", ".fna", ".ffn", ".fastq", ".fq"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return sample.parent / f"{name}_embeddings"


def record_of(frame_id: str) -> str:
    """The input record id of a frame id `<record>_chunk_<k><F1..R3>`."""
    return frame_id[:-2].rsplit("_chunk_", 1)[0]


# ---------------------------------------------------------------------- the run


def execute(options: RunOptions) -> RunResult:
    """Run embed-client to the end; raises a ClientError subclass when it cannot finish."""
    return asyncio.run(_Run(options).main())


@dataclass
class _OpenBlock:
    block: Block
    models: Tuple[str, ...]                          # the models computed for it in this run
    remaining: int                                   # items still unanswered (those models)
    embeddings: Dict[str, np.ndarray]
    rejected: List[Tuple[str, Item, str]] = field(default_factory=list)


class _Run:
    def __init__(self, options: RunOptions):
        self.o = options
        self.counters = Counters()
        self.prep_stats = PrepStats()
        self.out: Optional[OutputDir] = None
        self.servers: List[Server] = []          # connected and in the pull
        self.all_servers: List[Server] = []
        self.connecting: Dict[asyncio.Task, Server] = {}
        self.hidden: Dict[str, int] = {}
        self.max_batch: Dict[str, int] = {}
        self.open: Dict[int, _OpenBlock] = {}
        self.rejected: List[Tuple[str, str, str]] = []   # (model, frame id, message)
        self.sent = {m: 0 for m in options.models}
        self.received = {m: 0 for m in options.models}
        self.letters = {m: 0 for m in options.models}
        self.blocks_resumed = 0                  # committed blocks with all their parts
        self.blocks_repaired = 0                 # committed blocks with parts missing
        self.blocks_new = 0                      # blocks computed by this run from scratch
        self.reused = {m: 0 for m in options.models}  # rows an earlier run already embedded
        self.commit_lock: Optional[asyncio.Lock] = None
        self.commits: List[asyncio.Task] = []
        self.changed: Optional[asyncio.Event] = None
        self.validated = None
        self.classifier: Optional[Classifier] = None
        self.started = time.monotonic()
        self.send_started: Optional[float] = None
        self.send_elapsed = 0.0
        self.metrics: Optional[MetricsPoller] = None
        self.dispatcher: Optional[Dispatcher] = None

    # ------------------------------------------------------------------ steps

    async def main(self) -> RunResult:
        o = self.o
        try:
            if o.resume:
                # No server yet: a finished run needs none, an unfinished one only when a
                # block needs computing (the widths come from run.json meanwhile).
                OutputDir(o.out).check(o.resume)
                self._open_output()
                previous = self._finished_run()
                if previous is not None:
                    return self._complete_finished(previous)
            await self._validate()
            if o.classifier is not None:
                self.classifier = load_classifier(o.classifier, allow_pickle=o.allow_pickle)
            if o.resume:
                self._report_resume()
                if any(m not in self.hidden for m in o.models):  # run.json without widths
                    await self._connect_resumed()
                self._check_classifier()
            else:
                OutputDir(o.out).check(o.resume)
                await self._connect()
                self._check_classifier()
                self._open_output()
            return await self._stream_and_finish()
        finally:
            for task in self.connecting:
                task.cancel()
            for server in self.all_servers:
                await server.close()
            if self.out is not None:
                self.out.close()

    async def _validate(self) -> None:
        o = self.o
        policy = "skip" if o.skip_bad_records else "error"
        log.info("validating %s (bad records: %s)", o.sample, policy)
        self.validated = await asyncio.to_thread(reader.validate, o.sample, policy)
        v = self.validated
        log.info("%d records, %d kept, %d skipped", v.n_records, v.n_kept, len(v.skipped))

    async def _connect(self) -> None:
        """Start as soon as one server is ready; the others join the run when they are."""
        o = self.o
        self.all_servers = [Server(spec, o.transport) for spec in o.servers]
        tasks = {asyncio.ensure_future(s.connect(o.models)): s for s in self.all_servers}
        pending, errors = set(tasks), []
        while pending and not self.servers:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if error is None:
                    self.servers.append(tasks[task])
                elif isinstance(error, ServerUnavailableError):
                    log.warning("%s", error)
                    errors.append(str(error))
                else:
                    for other in pending:
                        other.cancel()
                    raise error
        if not self.servers:
            raise ServerUnavailableError("no server reachable: " + "; ".join(errors))
        self.connecting = {task: tasks[task] for task in pending}
        for model in o.models:
            widths = {s.spec.url: s.models[model].hidden for s in self.servers}
            if len(set(widths.values())) != 1:
                raise ServerError(f"model {model}: the servers disagree on the embedding width "
                                  f"{widths}")
            self.hidden[model] = next(iter(widths.values()))
            self.max_batch[model] = min(s.models[model].max_batch_size for s in self.servers)
        for server in self.servers:
            self._describe(server)
        for server in self.connecting.values():
            log.info("server %s is not ready yet; it joins the run when it is", server.spec.url)

    async def _connect_resumed(self) -> None:
        """Connect for --resume: the servers' widths must be the interrupted run's."""
        await self._connect()
        config = self.out.config
        require_same_run(config, dataclasses.replace(config, hidden=dict(self.hidden)), self.o.out)

    async def _ensure_servers(self) -> None:
        """A --resume run contacts the servers when its first block needs computing."""
        if self.servers:
            return
        await self._connect_resumed()
        for server in self.servers:
            self.dispatcher.add(server)
            self.metrics.add(server.spec.metrics_url)
        for task in list(self.connecting):
            task.add_done_callback(self._join_late)

    def _check_classifier(self) -> None:
        if self.classifier is None:
            return
        width = sum(self.hidden[m] for m in MERGE_ORDER)
        if self.classifier.input_dim != width:
            source = "the interrupted run's models" if not self.servers else "the servers' models"
            raise ClassifierError(
                f"classifier {self.o.classifier} takes {self.classifier.input_dim} features, but "
                f"{source} give {width} ("
                + " + ".join(f"{m} {self.hidden[m]}" for m in MERGE_ORDER) + ")")

    def _describe(self, server: Server) -> None:
        log.info("server %s: %s; %d requests in flight", server.spec.url,
                 ", ".join(f"{m} (width {i.hidden}, max batch {i.max_batch_size}, "
                           f"{i.instances} instances)" for m, i in server.models.items()),
                 server.in_flight)

    def _join_late(self, task: asyncio.Task) -> None:
        """A server that was not ready at the start: add it to the pull if it fits."""
        server = self.connecting.pop(task, None)
        if server is None or task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.warning("server %s left out: %s", server.spec.url, error)
            return
        misfit = [m for m in self.o.models
                  if server.models[m].hidden != self.hidden[m]
                  or server.models[m].max_batch_size < self.max_batch[m]]
        if misfit:
            log.warning("server %s left out: its %s differ in width or max_batch_size from "
                        "the other servers'", server.spec.url, ", ".join(misfit))
            return
        if not self.dispatcher.add(server):  # the run has stopped sending
            return
        self._describe(server)
        self.servers.append(server)
        self.metrics.add(server.spec.metrics_url)

    def _open_output(self) -> None:
        o = self.o
        try:
            sample_bytes = o.sample.stat().st_size
        except FileNotFoundError:
            raise InputError(str(o.sample), None, None, "no such file") from None
        config = RunConfig(
            sample=str(o.sample.resolve()), sample_bytes=sample_bytes, chunk=o.chunk,
            models=o.models, window=o.schedule.window, skip_bad_records=o.skip_bad_records,
            hidden=dict(self.hidden))
        self.out = OutputDir(o.out)
        self.out.open(config, resume=o.resume)
        if o.resume:
            stored = self.out.config.hidden
            self.hidden = {m: stored[m] for m in o.models if m in stored}

    def _previous_summary(self) -> dict:
        path = self.o.out / SUMMARY_FILE
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return summary if isinstance(summary, dict) else {}

    def _finished_run(self) -> Optional[dict]:
        """The summary of the run in --out when it is complete and its final files still hold
        every frame (counts from the footers, checked against the summary and the manifest);
        None otherwise."""
        o, out = self.o, self.out
        previous = self._previous_summary()
        if previous.get("status") != "complete":
            return None
        try:
            frames = int(previous["stages"]["prep"]["frames"])
        except (KeyError, TypeError, ValueError):
            return None
        problems = []
        for model in o.models:
            committed = sum(r.rows.get(model, 0) for r in out.manifest.values())
            rows = out.final_rows(model, self.hidden.get(model))
            if rows is None:
                problems.append(f"{out.final_path(model).name} is missing or unreadable")
            elif not rows == committed == frames:
                problems.append(f"{out.final_path(model).name} holds {rows:,} rows, the run "
                                f"committed {committed:,} of {frames:,} frames")
        if problems:
            log.warning("resume: %s says the run is complete, but %s; recomputing",
                        SUMMARY_FILE, "; ".join(problems))
            return None
        return previous

    def _complete_finished(self, previous: dict) -> RunResult:
        """--resume of a complete run: no server, no sample read; only the derived files this
        run asks for and lacks (merged.parquet, the predictions) are written."""
        o, out = self.o, self.out
        prep = previous["stages"]["prep"]
        frames, chunks = int(prep["frames"]), int(prep.get("chunks", 0))
        need_merged = o.merged and out.final_rows(
            "merged", sum(self.hidden.get(m, 0) for m in MERGE_ORDER)) != frames
        need_predictions = False
        if o.classifier is not None:
            if all((o.out / name).exists() for name in (PREDICTIONS_FILE, HIGHEST_FILE)):
                log.info("resume: %s and %s exist and are kept (remove them to predict again "
                         "with %s)", PREDICTIONS_FILE, HIGHEST_FILE, o.classifier)
            else:
                need_predictions = True
                self.classifier = load_classifier(o.classifier, allow_pickle=o.allow_pickle)
                self._check_classifier()
        summary, wrote = previous, []
        if need_merged or need_predictions:
            wrote = ([MERGED_FILE] if need_merged else []) + (
                [PREDICTIONS_FILE, HIGHEST_FILE] if need_predictions else [])
            log.info("resume: writing %s from the final files", ", ".join(wrote))
            try:
                rows, predictions = self._with_predictions(
                    need_predictions, lambda on_features: out.derive(self.hidden, need_merged, on_features))
            except OSError as e:
                raise self._write_failed("writing " + ", ".join(wrote), e) from e
            summary = json.loads(json.dumps(previous))
            if need_merged:
                summary["stages"].setdefault("write", {})["merged"] = {"rows_final": rows["merged"]}
            if predictions is not None:
                summary["stages"]["classifier"] = predictions
            try:
                out.write_summary(summary)
            except OSError as e:
                raise self._write_failed("writing summary.json", e) from e
        message = (f"resume: all {frames:,} frames / {chunks:,} chunks already embedded in "
                   f"{o.out}; " + (f"wrote the missing {', '.join(wrote)}" if wrote
                                  else "nothing to do"))
        return RunResult("complete", o.out, summary, message)

    def _report_resume(self) -> None:
        """One line: what the interrupted run left, and what is recomputed."""
        out = self.out
        if out.parts_removed:
            log.info("resuming %s: its final files were written and its parts removed, so all "
                     "%d committed blocks are computed again", self.o.out, len(out.manifest))
            return
        complete = out.blocks
        frames = sum(r.frames for r in complete.values())
        text = (f"resuming {self.o.out}: {len(complete)} of {len(out.manifest)} committed "
                f"blocks complete ({frames:,} frames)")
        if out.missing:
            parts = sum(len(models) for models in out.missing.values())
            listed = ", ".join(f"block {n}: {'+'.join(models)}"
                               for n, models in sorted(out.missing.items())[:5])
            text += (f"; {parts} part{'s' if parts != 1 else ''} missing ({listed}"
                     + (", ..." if len(out.missing) > 5 else "")
                     + "): recomputed for those models only")
        log.info("%s; any block not committed yet is computed now", text)

    # ------------------------------------------------------------------ streaming

    async def _stream_and_finish(self) -> RunResult:
        o = self.o
        self.commit_lock = asyncio.Lock()
        self.changed = asyncio.Event()
        self.counters = Counters(records_total=self.validated.n_kept,
                                 sequences_done={m: 0 for m in o.models})
        urls = [s.spec.metrics_url for s in self.servers]
        self.metrics = MetricsPoller(urls)
        tty = sys.stdout.isatty() if o.tty is None else o.tty
        progress = Progress(self.counters, self.metrics, tty=tty, interval=o.log_interval)
        dispatcher = self.dispatcher = Dispatcher(self.servers, self._on_result, self._on_reject)
        loop = asyncio.get_running_loop()
        main_task = asyncio.current_task()
        try:
            loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals
            pass
        status, error = "failed", None
        progress.start()
        self.send_started = time.monotonic()
        try:
            dispatcher.start()
            for task in list(self.connecting):
                task.add_done_callback(self._join_late)
            producer = asyncio.ensure_future(self._produce(dispatcher))
            failed = asyncio.ensure_future(dispatcher.failed.wait())
            try:
                await asyncio.wait({producer, failed}, return_when=asyncio.FIRST_COMPLETED)
                if producer.done():
                    producer.result()  # an input or output error raises here
                    while self.open and not dispatcher.failed.is_set():
                        self.changed.clear()
                        waiter = asyncio.ensure_future(self.changed.wait())
                        await asyncio.wait({waiter, failed}, return_when=asyncio.FIRST_COMPLETED)
                        waiter.cancel()
                if dispatcher.failed.is_set():
                    raise dispatcher.error
            finally:
                for task in (producer, failed):
                    task.cancel()
                await dispatcher.close()
                await asyncio.gather(*self.commits, return_exceptions=True)
            status = "sent"
        except asyncio.CancelledError:
            status, error = "interrupted", InterruptedRun(
                f"interrupted; continue with --resume --out {o.out}")
        except BaseException as e:  # every failure still leaves a summary behind
            error = e
        finally:
            self.send_elapsed = time.monotonic() - self.send_started
            progress.stop()
            try:
                loop.remove_signal_handler(signal.SIGTERM)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        if error is not None:
            self._summary_after_error(status, str(error))
            raise error
        return self._finish()

    def _with_predictions(self, predict: bool, write: Callable) -> tuple:
        """(write(on_features), the classifier's counts or None): with `predict`, every block's
        merged features also go through the classifier into the prediction files, which are
        removed again when anything fails (the error goes on to the caller)."""
        if not predict:
            return write(None), None
        writer = PredictionWriter(self.o.out)
        try:
            rows = write(lambda ids, x: writer.add(ids, self.classifier.predict_proba(x)))
            return rows, writer.close()
        except BaseException:
            writer.abort()
            raise

    def _write_failed(self, what: str, error: OSError) -> OutputWriteError:
        return OutputWriteError(f"{what} in {self.o.out} failed: {error}; once fixed, continue "
                                f"with --resume --out {self.o.out}")

    def _summary_after_error(self, status: str, message: str) -> None:
        """summary.json for a failed run; a failure to write it must not hide the run's error."""
        try:
            self._write_summary(status, message)
        except OSError as e:
            log.error("could not write %s: %s", self.o.out / "summary.json", e)

    def _frames(self) -> Iterator[Tuple[str, Dict[str, str]]]:
        """(frame id, {model: text}) in input order; counts records as prep reads them."""
        models = self.o.models
        fields = {m: MODEL_INPUT[m] for m in models}
        counters = self.counters
        stats = self.prep_stats
        for frame in prepare(self.validated.records(), self.o.chunk, stats=stats):
            # prep works in batches: its counters move together, a batch at a time
            counters.records_read = stats.records
            counters.frames_prepped = stats.frames
            yield frame.frame_id, {m: getattr(frame, f) for m, f in fields.items()}
        counters.records_read = stats.records
        counters.frames_prepped = stats.frames
        counters.prep_done = True

    async def _produce(self, dispatcher: Dispatcher) -> None:
        o = self.o
        blocks = blocks_of(self._frames(), o.schedule.window, o.models)
        while True:
            block = await asyncio.to_thread(next, blocks, None)
            if block is None:
                break
            models = o.models
            done = self.out.manifest.get(block.number)
            if done is not None:
                if not done.matches(block.first_index, block.keys):
                    raise OutputError(
                        f"--resume: block {block.number} of the input differs from the "
                        f"interrupted run's (the sample or the prep changed); start a new run")
                missing = self.out.missing.get(block.number)
                if missing is None:
                    self.blocks_resumed += 1
                    self.counters.frames_resumed += block.size
                    for model in o.models:
                        self.reused[model] += block.size
                    continue
                models = tuple(m for m in o.models if m in missing)
                self.blocks_repaired += 1
                for model in o.models:
                    if model not in models:
                        self.reused[model] += block.size
                        self.counters.sequences_done[model] += block.size  # display only
            else:
                self.blocks_new += 1
            await self._ensure_servers()
            # Open a block only when the queue runs low, and hold few blocks in memory.
            while self.open and (len(self.open) >= MAX_OPEN_BLOCKS
                                 or dispatcher.queue.qsize()
                                 >= sum(s.in_flight for s in self.servers)):
                self.changed.clear()
                await self.changed.wait()
            self._open_block(block, dispatcher, models)
        self.counters.prep_done = True
        if o.resume:
            repaired = (f", {self.blocks_repaired} with parts recomputed"
                        if self.blocks_repaired else "")
            log.info("resume: %d blocks were already complete (%d frames)%s, %d computed%s",
                     self.blocks_resumed, self.counters.frames_resumed, repaired, self.blocks_new,
                     "" if self.servers else "; no server was needed")
        self.changed.set()

    def _open_block(self, block: Block, dispatcher: Dispatcher, models: Tuple[str, ...]) -> None:
        o = self.o
        self.open[block.number] = _OpenBlock(
            block, models, remaining=block.size * len(models),
            embeddings={m: np.empty((block.size, self.hidden[m]), np.float32) for m in models})
        per_model = []
        for model in models:
            items = block.items[model]
            self.sent[model] += len(items)
            per_model.append(cut_requests(model, block.number, items, o.schedule.token_budget,
                                          self.max_batch[model], LETTERS_PER_TOKEN[model]))
        dispatcher.submit(interleave(per_model))

    # ------------------------------------------------------------------ callbacks

    def _on_result(self, request: Request, embeddings: np.ndarray) -> None:
        state = self.open[request.block]
        first = state.block.first_index
        rows = [item.index - first for item in request.items]
        state.embeddings[request.model][rows] = embeddings
        n = len(request.items)
        self.received[request.model] += n
        self.letters[request.model] += request.letters
        self.counters.sequences_done[request.model] += n
        self.counters.tokens_done += request.tokens
        self._answered(state, n)

    def _on_reject(self, request: Request, item: Item, message: str) -> None:
        log.error("model %s rejected frame %s (record %s): %s",
                  request.model, item.key, record_of(item.key), message)
        state = self.open[request.block]
        state.rejected.append((request.model, item, message))
        self.rejected.append((request.model, item.key, message))
        self._answered(state, 1)

    def _answered(self, state: _OpenBlock, n: int) -> None:
        state.remaining -= n
        if state.remaining == 0:
            if state.rejected:  # a block is all or nothing: it stays unfinished
                del self.open[state.block.number]
            else:
                self.commits.append(asyncio.ensure_future(self._commit(state)))
        self.changed.set()

    async def _commit(self, state: _OpenBlock) -> None:
        block = state.block
        tables = {}
        for model in state.models:
            lengths = [len(item.text) for item in block.items[model]]
            tables[model] = (state.embeddings[model], lengths)
        try:
            async with self.commit_lock:
                await asyncio.to_thread(self.out.commit, block.number, block.first_index,
                                        block.keys, tables, self.o.models)
        except OSError as e:  # e.g. a full disk: end the run, the block stays unfinished
            self.dispatcher.fail(self._write_failed(f"writing block {block.number}", e))
            return
        except Exception as e:  # a bug: end the run with it
            self.dispatcher.fail(e)
            return
        del self.open[block.number]
        self.changed.set()

    # ------------------------------------------------------------------ the end

    def _rows(self) -> Dict[str, int]:
        return {m: sum(r.rows.get(m, 0) for r in self.out.blocks.values()) for m in self.o.models}

    def _finish(self) -> RunResult:
        o = self.o
        frames = self.prep_stats.frames
        rows = self._rows()
        problems = [f"{m}: {frames} frames in, {rows[m]} embeddings out"
                    for m in o.models if rows[m] != frames]
        if self.prep_stats.records != self.validated.n_kept:
            problems.append(f"reader: {self.validated.n_kept} records kept, "
                            f"{self.prep_stats.records} prepped")
        if self.rejected or problems:
            self._write_rejected()
            message = "; ".join(problems)
            if self.rejected:
                listed = ", ".join(f"{m} {record_of(k)} ({k}): {msg}"
                                   for m, k, msg in self.rejected[:5])
                message = (f"{len(self.rejected)} sequences rejected by the server ({listed}"
                           + (", ..." if len(self.rejected) > 5 else "")
                           + f"; all in {o.out / 'rejected.tsv'}); " + message)
            message += "; no final files written"
            self._summary_after_error("incomplete", message)
            raise IncompleteError(message)
        try:
            final_rows, predictions = self._with_predictions(
                self.classifier is not None,
                lambda on_features: self.out.finalize(o.models, self.hidden, o.merged, on_features))
        except BaseException as e:
            self._summary_after_error("failed", f"writing the final files failed: {e}")
            if isinstance(e, OSError):
                raise self._write_failed("writing the final files", e) from e
            raise
        bad = {name: n for name, n in final_rows.items() if n != frames}
        if bad:
            message = f"final files hold {bad} rows, expected {frames} each"
            self._summary_after_error("incomplete", message)
            raise IncompleteError(message)
        try:
            summary = self._write_summary("complete", None, final_rows, predictions)
        except OSError as e:
            raise self._write_failed("writing summary.json", e) from e
        return RunResult("complete", o.out, summary)

    def _write_rejected(self) -> None:
        if not self.rejected:
            return
        with open(self.o.out / "rejected.tsv", "w", encoding="utf-8") as fh:
            fh.write("model\trecord_id\tframe_id\tmessage\n")
            for model, key, message in self.rejected:
                fh.write(f"{model}\t{record_of(key)}\t{key}\t{message}\n")

    def _write_summary(self, status: str, message: Optional[str],
                       final_rows: Optional[Dict[str, int]] = None,
                       predictions: Optional[Dict[str, int]] = None) -> dict:
        o = self.o
        v = self.validated
        stats = self.prep_stats
        elapsed = time.monotonic() - self.started
        send_s = max(self.send_elapsed, 1e-9)
        sequences = sum(self.received.values())
        tokens = sum(self.letters[m] + SPECIAL_TOKENS * self.received[m] for m in o.models)
        committed = self._rows() if self.out is not None else {}
        server_tokens = {}
        if self.metrics is not None:
            server_tokens = {f"{url} gpu {gpu}": int(n)
                             for (url, gpu), n in self.metrics.tokens_since_start().items()}
        skipped = [str(p) for p in v.skipped]
        if skipped:
            with open(o.out / "skipped.tsv", "w", encoding="utf-8") as fh:
                fh.write("file\trecord_id\tline\tproblem\n")
                for p in v.skipped:
                    fh.write(f"{p.file}\t{p.record or ''}\t{p.line or ''}\t{p.problem}\n")
        summary = {
            "status": status,
            "message": message,
            "resumable": status != "complete",
            "sample": str(o.sample),
            "out": str(o.out),
            "chunk": o.chunk,
            "models": list(o.models),
            "servers": [s.spec.url for s in self.all_servers],
            "resumed": {"blocks": self.blocks_resumed, "frames": self.counters.frames_resumed,
                        "blocks_with_missing_parts": self.blocks_repaired},
            "stages": {
                "read": {"records_in_file": v.n_records, "records_kept": v.n_kept,
                         "records_skipped": len(v.skipped), "skipped": skipped[:LISTED],
                         "records_prepped": stats.records, "bases": stats.bases},
                "prep": {"chunks": stats.chunks, "frames": stats.frames,
                         "residues": stats.residues, "frames_with_stop": stats.frames_with_stop,
                         "empty_frames": stats.empty_frames,
                         "chunks_without_frames": stats.chunks_without_frames},
                "send": {m: {"sequences_in": stats.frames,
                             "already_done": self.reused[m],
                             "sequences_sent": self.sent[m],
                             "sequences_received": self.received[m],
                             "rejected": sum(1 for r in self.rejected if r[0] == m),
                             "letters": self.letters[m]} for m in o.models},
                "write": {m: {"rows_committed": committed.get(m, 0),
                              "rows_final": (final_rows or {}).get(m),
                              "hidden": self.hidden.get(m)} for m in o.models},
            },
            "rejected": [{"model": m, "record_id": record_of(k), "frame_id": k, "message": msg}
                         for m, k, msg in self.rejected[:LISTED]],
            "servers_detail": {s.spec.url: {"joined": s in self.servers,
                                            "requests": s.stats.requests,
                                            "sequences": s.stats.sequences,
                                            "retries": s.stats.retries,
                                            "given_up": s.stats.given_up}
                               for s in self.all_servers},
            "elapsed_s": round(elapsed, 3),
            "send_elapsed_s": round(self.send_elapsed, 3),
            "throughput": {"sequences_per_s": round(sequences / send_s, 2),
                           "tokens_per_s": round(tokens / send_s, 1),
                           "tokens_note": "client estimate: letters + 2 per sequence",
                           "server_tokens": server_tokens},
        }
        if final_rows and "merged" in final_rows:
            summary["stages"]["write"]["merged"] = {"rows_final": final_rows["merged"]}
        if predictions is not None:
            summary["stages"]["classifier"] = predictions
        if self.out is not None:
            self.out.write_summary(summary)
        return summary
