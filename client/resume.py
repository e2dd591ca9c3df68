"""--resume: what the interrupted run left, what is computed again, and finished runs.

The output directory is opened before any server is contacted. A run whose summary says
complete and whose final files still hold that many rows, with the bytes checksums.sha256
records, is finished without parsing the sample (only its sha256 is read, to check it is the
same) or contacting a server: only derived files it now asks for and lacks or that changed
(merged.parquet, the predictions) are written from the final files. Otherwise each block of
the input is checked against the manifest (`ResumePlan.models_to_compute`): a committed block
with all its parts is skipped, one with parts missing is computed for those models only, any
other block is computed; the servers are contacted at the first block to compute.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

from .classifier import HIGHEST_FILE, PREDICTIONS_FILE, load_classifier, write_with_predictions
from .errors import OutputError, OutputWriteError
from .finals import derive
from .integrity import CHECKSUMS_FILE, changed_files, write_checksums
from .options import RunOptions, RunResult
from .progress import Counters
from .report import Tally
from .schedule import Block
from .servers import ServerPool
from .sink import MERGE_ORDER, MERGED_FILE, SUMMARY_FILE, OutputDir, require_same_run

log = logging.getLogger("embed_client")

# Written from the embedding files: a changed one is written again when the --resume asks it.
DERIVED = (MERGED_FILE, PREDICTIONS_FILE, HIGHEST_FILE)


class ResumePlan:
    """Per block of the input: which models this run computes for it (none: already done)."""

    def __init__(self, out: OutputDir, models: Sequence[str], tally: Tally, counters: Counters):
        self.out = out
        self.models = tuple(models)
        self.tally = tally
        self.counters = counters

    def models_to_compute(self, block: Block) -> Tuple[str, ...]:
        """The models to compute for `block`, counting what an earlier run already did."""
        done = self.out.manifest.get(block.number)
        if done is None:
            self.tally.blocks_new += 1
            return self.models
        if not done.matches(block.first_index, block.frame_ids):
            raise OutputError(
                f"--resume: block {block.number} of the input differs from the "
                f"interrupted run's (the sample or the prep changed); start a new run")
        missing = self.out.missing.get(block.number, ())
        models = tuple(m for m in self.models if m in missing)
        if models:
            self.tally.blocks_repaired += 1
        else:
            self.tally.blocks_resumed += 1
            self.counters.frames_resumed += block.size
        for model in self.models:
            if model not in models:
                self.tally.reused[model] += block.size
                if models:  # a repaired block: its other models count as done (display only)
                    self.counters.sequences_done[model] += block.size
        return models

    def log_outcome(self, servers_needed: bool) -> None:
        """One line at the end of the input: blocks skipped, repaired and computed."""
        tally = self.tally
        repaired = (f", {tally.blocks_repaired} with parts recomputed"
                    if tally.blocks_repaired else "")
        log.info("resume: %d blocks were already complete (%d frames)%s, %d computed%s",
                 tally.blocks_resumed, self.counters.frames_resumed, repaired, tally.blocks_new,
                 "" if servers_needed else "; no server was needed")


async def connect(pool: ServerPool, out: OutputDir) -> None:
    """Connect for --resume: the servers' widths must be the interrupted run's."""
    await pool.connect()
    config = out.config
    require_same_run(config, dataclasses.replace(config, hidden=dict(pool.hidden)), out.path)


def describe(out: OutputDir) -> None:
    """One line: what the interrupted run left, and what is recomputed."""
    if out.parts_removed:
        log.info("resuming %s: its final files were written and its parts removed, so all "
                 "%d committed blocks are computed again", out.path, len(out.manifest))
        return
    complete = out.blocks
    frames = sum(r.frames for r in complete.values())
    text = (f"resuming {out.path}: {len(complete)} of {len(out.manifest)} committed "
            f"blocks complete ({frames:,} frames)")
    gone = {n: tuple(m for m in models if (n, m) not in out.corrupt)
            for n, models in out.missing.items()}
    bad = {n: tuple(m for m in models if (n, m) in out.corrupt)
           for n, models in out.missing.items()}
    for label, blocks in (("missing", gone), ("corrupted", bad)):
        blocks = {n: models for n, models in blocks.items() if models}
        if blocks:
            parts = sum(len(models) for models in blocks.values())
            listed = ", ".join(f"block {n}: {'+'.join(models)}"
                               for n, models in sorted(blocks.items())[:5])
            text += (f"; {parts} part{'s' if parts != 1 else ''} {label} ({listed}"
                     + (", ..." if len(blocks) > 5 else "") + ")")
    if out.missing:
        text += ": recomputed for those models only"
    log.info("%s; any block not committed yet is computed now", text)


class Finished(NamedTuple):
    """A finished run: its summary, and {name: what is wrong} for its derived files (DERIVED)
    that no longer match checksums.sha256 (hashed once, by `finished_run`)."""
    summary: dict
    changed: Dict[str, str]


def finished_run(out: OutputDir, models: Sequence[str], hidden: Dict[str, int]) -> Optional[Finished]:
    """The run in `out` when it is complete and its final files still hold every frame
    (counts from the footers, checked against the summary and the manifest); None otherwise."""
    previous = _previous_summary(out)
    if previous.get("status") != "complete":
        return None
    try:
        frames = int(previous["stages"]["prep"]["frames"])
    except (KeyError, TypeError, ValueError):
        return None
    problems = []
    for model in models:
        committed = sum(r.rows.get(model, 0) for r in out.manifest.values())
        rows = out.final_rows(model, hidden.get(model))
        if rows is None:
            problems.append(f"{out.final_path(model).name} is missing or unreadable")
        elif not rows == committed == frames:
            problems.append(f"{out.final_path(model).name} holds {rows:,} rows, the run "
                            f"committed {committed:,} of {frames:,} frames")
    changed: Dict[str, str] = {}
    if not problems:  # the embedding files' bytes against checksums.sha256
        changed = changed_files(out.path)
        problems = [f"{name} {problem}" for name, problem in changed.items()
                    if name not in DERIVED]
    if problems:
        log.warning("resume: %s says the run is complete, but %s; recomputing",
                    SUMMARY_FILE, "; ".join(problems))
        return None
    return Finished(previous, {n: p for n, p in changed.items() if n in DERIVED})


def _previous_summary(out: OutputDir) -> dict:
    try:
        summary = json.loads((out.path / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def complete_finished(finished: Finished, out: OutputDir, options: RunOptions,
                      hidden: Dict[str, int]) -> RunResult:
    """--resume of a complete run: no server, no sample read; only the derived files this
    run asks for and lacks (merged.parquet, the predictions) are written."""
    previous, changed = finished
    prep = previous["stages"]["prep"]
    frames, chunks = int(prep["frames"]), int(prep.get("chunks", 0))
    for name, problem in changed.items():
        log.warning("resume: %s %s; %s", name, problem,
                    "written again" if (options.merged if name == MERGED_FILE
                                        else options.classifier is not None)
                    else "ask for it (--merged / --classifier) to write it again")
    need_merged = options.merged and (MERGED_FILE in changed or out.final_rows(
        "merged", sum(hidden.get(m, 0) for m in MERGE_ORDER)) != frames)
    classifier = None
    if options.classifier is not None:
        predictions = (PREDICTIONS_FILE, HIGHEST_FILE)
        if all((out.path / n).exists() and n not in changed for n in predictions):
            log.info("resume: %s and %s exist and are kept (remove them to predict again "
                     "with %s)", PREDICTIONS_FILE, HIGHEST_FILE, options.classifier)
        else:
            classifier = load_classifier(options.classifier, allow_pickle=options.allow_pickle)
            classifier.require_width(hidden, "the interrupted run's models", options.classifier)
    summary, wrote = previous, []
    if need_merged or classifier is not None:
        wrote = ([MERGED_FILE] if need_merged else []) + (
            [PREDICTIONS_FILE, HIGHEST_FILE] if classifier is not None else [])
        log.info("resume: writing %s from the final files", ", ".join(wrote))
        try:
            rows, predictions = write_with_predictions(
                classifier, out.path,
                lambda on_features: derive(out, hidden, need_merged, on_features))
        except OSError as e:
            raise OutputWriteError.resumable("writing " + ", ".join(wrote), out.path, e) from e
        summary = json.loads(json.dumps(previous))
        if need_merged:
            summary["stages"].setdefault("write", {})["merged"] = {"rows_final": rows["merged"]}
        if predictions is not None:
            summary["stages"]["classifier"] = predictions
        try:
            write_checksums(out.path, wrote)
            out.write_summary(summary)
        except OSError as e:
            raise OutputWriteError.resumable(f"writing {CHECKSUMS_FILE}, summary.json",
                                             out.path, e) from e
    what = (f"{frames:,} sequences" if options.plain
            else f"{frames:,} frames / {chunks:,} chunks")
    message = (f"resume: all {what} already embedded in "
               f"{out.path}; " + (f"wrote the missing {', '.join(wrote)}" if wrote
                                  else "nothing to do"))
    return RunResult("complete", out.path, summary, message)
