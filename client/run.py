"""One embed-client run: validate -> prep -> schedule -> send -> write -> summary.

`execute(options)` reads as the list above:
1. validate the whole input (nothing is sent when a record is bad, unless skip);
2. load the classifier, if any (its width is checked against the servers' models);
3. connect to every server, read the models' configs (servers.py: max_batch_size, widths);
4. open the output directory, fresh or for --resume (resume.py: what is computed again);
5. stream (pipeline.py): reader -> VirNucPro prep -> blocks of `window` frames ->
   length-sorted requests -> the transport's shared queue -> embeddings -> one commit per
   finished block;
6. check counts in == counts out per model, write the final Parquet files (and the merged
   features and predictions), and the report (report.py: summary.json, skipped.tsv).
Every outcome after step 4 leaves summary.json saying what happened; only a run whose
counts all match is "complete".

--resume opens the output directory first and contacts no server until a block needs
computing; a run found complete is finished without parsing the sample (resume.py); its
sha256 is read first in every --resume, to refuse another sample (integrity.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Dict, Optional

from . import finals, inputs, plain, reader, resume
from .classifier import Classifier, load_classifier, write_with_predictions
from .errors import IncompleteError, InputError, InterruptedRun, OutputWriteError
from .integrity import file_sha256, short, write_checksums
from .options import RunOptions, RunResult
from .pipeline import Pipeline, frames_of
from .progress import Counters
from .report import REJECTED_FILE, Report, Tally
from .servers import ServerPool
from .sink import OutputDir, RunConfig
from .virnucpro import PrepStats, record_of

log = logging.getLogger("embed_client")


def execute(options: RunOptions) -> RunResult:
    """Run embed-client to the end; raises a ClientError subclass when it cannot finish."""
    options = inputs.spool_stdin(options)  # `--sample -`: the run reads the spooled copy
    return asyncio.run(_Run(options).main())


class _Run:
    """The parts of one run, made in the order `main` lists."""

    def __init__(self, options: RunOptions):
        self.options = options
        self.started = time.monotonic()
        self.out = OutputDir(options.out)
        self.pool = ServerPool(options.servers, options.transport, options.models,
                               resolve_every=options.resolve_every)
        self.validated: Optional[reader.ValidatedInput] = None
        self.classifier: Optional[Classifier] = None
        self.sample_sha256: Optional[str] = None
        self.limits: Dict[str, int] = {}       # plain mode: longest sequence per model

    async def main(self) -> RunResult:
        """The steps of the module docstring; servers and the output directory are closed at the end."""
        options = self.options
        try:
            if options.resume:
                # No server yet: a finished run needs none, an unfinished one only when a
                # block needs computing (the widths come from run.json meanwhile).
                self.out.check(resume=True)
                await self._fingerprint()
                self._open_output()
                finished = resume.finished_run(self.out, options.models, self.pool.hidden)
                if finished is not None and finals.lacks_per_token(self.out, options, finished.summary):
                    finished = None          # its HDF5 file is gone: computed again
                if finished is not None:
                    return resume.complete_finished(finished, self.out, options, self.pool.hidden)
            if options.resume:
                await self._validate()
            else:  # both read the whole sample: at the same time
                await asyncio.gather(self._validate(), self._fingerprint())
            if options.classifier is not None:
                self.classifier = load_classifier(options.classifier,
                                                  allow_pickle=options.allow_pickle)
            if options.resume:
                resume.describe(self.out)
                if any(m not in self.pool.hidden for m in options.models):  # run.json without widths
                    await resume.connect(self.pool, self.out)
                self._check_classifier()
                await self._check_asked()
            else:
                self.out.check(resume=False)
                await self.pool.connect()
                self._check_classifier()
                self.limits = plain.max_lengths(self.pool.joined, options.models)
                await self._check_asked()
                self._open_output()
            return await self._stream_and_finish()
        finally:
            await self.pool.close()
            self.out.close()

    async def _validate(self) -> None:
        """Check the whole input before anything is sent (in a thread: the loop stays free)."""
        options = self.options
        policy = "skip" if options.skip_bad_records else "error"
        log.info("validating %s (bad records: %s)", options.sample, policy)
        self.validated = await asyncio.to_thread(reader.validate, options.sample, policy,
                                                 alphabet=plain.alphabet(options.plain))
        v = self.validated
        log.info("%d records, %d kept, %d skipped", v.n_records, v.n_kept, len(v.skipped))
        await asyncio.to_thread(inputs.check, v, options.plain)  # RNA said; DNA as proteins refused

    async def _fingerprint(self) -> None:
        """The sample's sha256 (its identity for --resume), in a thread."""
        sample = self.options.sample
        try:
            self.sample_sha256 = await asyncio.to_thread(file_sha256, sample)
        except FileNotFoundError:
            raise InputError(str(sample), None, None, "no such file") from None
        except OSError as e:
            raise InputError(str(sample), None, None, f"cannot be read: {e}") from None
        log.info("sample %s: sha256 %s", sample, short(self.sample_sha256))

    def _check_classifier(self) -> None:
        """The classifier, if any, must take the models' merged width, before anything is sent."""
        if self.classifier is not None:
            source = "the servers' models" if self.pool.joined else "the interrupted run's models"
            self.classifier.require_width(self.pool.hidden, source, self.options.classifier)

    async def _check_asked(self) -> None:
        """Before anything is sent: the servers have the outputs asked (--include), and in plain
        mode under --too-long error no record is over the model's maximum."""
        options = self.options
        await plain.check_asked(self.pool.joined, options)
        if options.plain and options.too_long == "error":
            await asyncio.to_thread(plain.check_lengths, self.validated, options.plain,
                                    self.limits[options.models[0]])

    def _open_output(self) -> None:
        """Open --out for this run (fresh, or --resume: then the widths are the stored ones)."""
        options = self.options
        try:
            sample_bytes = options.sample.stat().st_size
        except FileNotFoundError:
            raise InputError(str(options.sample), None, None, "no such file") from None
        config = RunConfig(
            sample=str(options.sample.resolve()), sample_bytes=sample_bytes, chunk=options.chunk,
            models=options.models, window=options.schedule.window,
            skip_bad_records=options.skip_bad_records, hidden=dict(self.pool.hidden),
            sample_sha256=self.sample_sha256, asked=plain.asked(options),
            max_length=dict(self.limits))
        self.out.open(config, resume=options.resume)
        if options.resume:
            stored = self.out.config.hidden
            self.pool.hidden = {m: stored[m] for m in options.models if m in stored}
            self.limits = dict(self.out.config.max_length)

    async def _stream_and_finish(self) -> RunResult:
        """Stream the input through the pipeline, then finish; a failure leaves its summary."""
        options = self.options
        prep = PrepStats()
        tally = Tally(options.models)
        counters = Counters(records_total=self.validated.n_kept,
                            sequences_done={m: 0 for m in options.models})
        prep_plain = None
        if options.plain:
            prep_plain = plain.PlainPrep(options.plain, options.too_long,
                                         self.limits[options.models[0]], prep, counters)
            frames = prep_plain.items(self.validated.records())
        else:
            frames = frames_of(self.validated.records(), options.chunk, options.models, prep,
                               counters)
        plan = resume.ResumePlan(self.out, options.models, tally, counters)
        pipeline = Pipeline(options, frames, self.out, self.pool, plan, tally, counters)
        extended = options.plain or finals.needs_own_finals(options)
        report = (plain.PlainReport if extended else Report)(
            options=options, started=self.started, tally=tally, counters=counters,
            validated=self.validated, prep=prep, out=self.out, pool=self.pool,
            metrics=pipeline.metrics, **({"plain": prep_plain} if extended else {}))
        try:
            await pipeline.run()
        except BaseException as error:  # every failure still leaves a summary behind
            status = "interrupted" if isinstance(error, InterruptedRun) else "failed"
            report.write_after_error(status, str(error))
            raise
        return self._finish(report)

    def _finish(self, report: Report) -> RunResult:
        """Counts in == counts out per model, then the final files, predictions and summary."""
        options, out = self.options, self.out
        frames = report.prep.frames
        rows = out.committed_rows(options.models)
        problems = [f"{m}: {frames} frames in, {rows[m]} embeddings out"
                    for m in options.models if rows[m] != frames]
        if report.prep.records != self.validated.n_kept:
            problems.append(f"reader: {self.validated.n_kept} records kept, "
                            f"{report.prep.records} prepped")
        rejected = report.tally.rejected
        if rejected or problems:
            report.write_rejected()
            message = "; ".join(problems)
            if rejected:
                listed = ", ".join(f"{m} {record_of(f)} ({f}): {msg}" for m, f, msg in rejected[:5])
                message = (f"{len(rejected)} sequences rejected by the server ({listed}"
                           + (", ..." if len(rejected) > 5 else "")
                           + f"; all in {options.out / REJECTED_FILE}); " + message)
            message += "; no final files written"
            report.write_after_error("incomplete", message)
            raise IncompleteError(message)
        try:
            final_rows, predictions = write_with_predictions(
                self.classifier, out.path,
                lambda on_features: finals.finalize(out, options, self.pool.hidden, on_features))
        except BaseException as e:
            report.write_after_error("failed", f"writing the final files failed: {e}")
            if isinstance(e, OSError):
                raise OutputWriteError.resumable("writing the final files", out.path, e) from e
            raise
        bad = {name: n for name, n in final_rows.items() if n != frames}
        if bad:
            message = f"final files hold {bad} rows, expected {frames} each"
            report.write_after_error("incomplete", message)
            raise IncompleteError(message)
        warning = _no_frames_warning(report.prep) if frames == 0 else None
        if warning:
            log.warning("%s", warning)
        try:
            report.write_skipped()
            write_checksums(out.path)  # every output file, for a later --resume (and sha256sum -c)
            summary = report.write("complete", warning, final_rows, predictions)
        except OSError as e:
            raise OutputWriteError.resumable("writing summary.json", out.path, e) from e
        return RunResult("complete", options.out, summary)


def _no_frames_warning(prep) -> str:
    """Why a sample gave nothing to embed (the final files are empty, the run is complete)."""
    return (f"the sample gave 0 frames to embed: {prep.records:,} records, {prep.chunks:,} "
            f"chunks, {prep.frames_with_stop:,} frames dropped for a stop codon, "
            f"{prep.empty_frames:,} empty; the final files hold no rows (is this the right "
            f"sample, and --chunk?)")
