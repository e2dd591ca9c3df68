"""The output directory: Parquet parts committed atomically, a resume manifest, final files.

Layout of `--out DIR`:
    run.json                 what the run is (sample, chunk, models, window, hidden sizes)
    manifest.jsonl           one line per committed block (append-only, fsynced), with the
                             sha256 of each of its parts
    parts/<model>/block-NNNNNNNN.parquet   one part per model per committed block
    <model>.parquet          final per-model table (written at the end, then parts removed)
    merged.parquet           optional: DNABERT-S then ESM-2 features per frame (--merged)
    summary.json             counts per stage; "status": "complete" only when all matched
    stdin.input              the input read from standard input (`--sample -`), spooled first

A block's parts are written under a temporary name and renamed; the manifest line is appended
after the renames, so a block is finished exactly when its manifest line exists. Parts that
no manifest line names (a crash between rename and append) are deleted on resume. A block
whose manifest line exists but some of whose parts are gone (deleted by hand) is recomputed
for those models only, and committed again with a second manifest line (the last one wins).
Final files are written as `*.partial` and renamed, so nothing partial looks finished; once
they are in place the parts are removed (the manifest stays: the run's bookkeeping).
The sample is identified by the sha256 of its bytes (run.json), and a part whose bytes no
longer match the manifest's sha256 is treated as missing on resume (integrity.py).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .errors import OutputError, OutputNotWritable, OutputWriteError
from .integrity import CorruptPart, file_sha256, part_problem, read_part, short
from .tables import aligned, embedding_schema, embedding_table, vectors

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
MANIFEST_FILE = "manifest.jsonl"
SUMMARY_FILE = "summary.json"
STDIN_FILE = "stdin.input"   # `--sample -`: standard input spooled here before the run (inputs.py)
PARTS_DIR = "parts"
MERGED_FILE = "merged.parquet"
MERGE_ORDER = ("dnabert_s", "esm2")  # VirNucPro's feature order: nucleotide first
FORMAT_VERSION = 1


@dataclass(frozen=True)
class RunConfig:
    """What defines a run's content; a resumed run must match it."""

    sample: str
    sample_bytes: int
    chunk: int
    models: Tuple[str, ...]
    window: int
    skip_bad_records: bool
    hidden: Dict[str, int] = field(default_factory=dict)
    version: int = FORMAT_VERSION
    sample_sha256: Optional[str] = None        # None: a run.json written before fingerprints
    asked: Dict[str, object] = field(default_factory=dict)   # plain mode, --include... (plain.asked)
    max_length: Dict[str, int] = field(default_factory=dict)  # plain mode: letters per model

    def to_json(self) -> dict:
        data = asdict(self)
        data["models"] = list(self.models)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "RunConfig":
        data = dict(data)
        data["models"] = tuple(data["models"])
        return cls(**data)

    def mismatches(self, other: "RunConfig") -> List[str]:
        """Human-readable differences that make `other` a different run."""
        out = []
        if self.sample_sha256 and other.sample_sha256:
            if self.sample_sha256 != other.sample_sha256:
                out.append(f"sample content: interrupted run {self.sample} (sha256 "
                           f"{short(self.sample_sha256)}), now {other.sample} (sha256 "
                           f"{short(other.sample_sha256)}): a different sample")
        elif self.sample_bytes != other.sample_bytes:  # a run.json without a fingerprint
            out.append(f"sample size (bytes): interrupted run {self.sample_bytes!r}, now "
                       f"{other.sample_bytes!r}")
        for name, label in (("chunk", "--chunk"),
                            ("models", "--models"), ("window", "--window"),
                            ("skip_bad_records", "--skip-bad-records"),
                            ("version", "output format version")):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{label}: interrupted run {mine!r}, now {theirs!r}")
        for key in sorted(set(self.asked) | set(other.asked)):
            mine, theirs = self.asked.get(key), other.asked.get(key)
            if mine != theirs:
                out.append(f"--{key.replace('_', '-')}: interrupted run {mine!r}, now {theirs!r}")
        for model in set(self.hidden) & set(other.hidden):
            if self.hidden[model] != other.hidden[model]:
                out.append(f"{model} hidden size: interrupted run {self.hidden[model]}, "
                           f"server now {other.hidden[model]}")
        return out


@dataclass(frozen=True)
class BlockRecord:
    """A committed block as the manifest records it."""

    block: int
    first_index: int
    frames: int
    first_id: str
    last_id: str
    rows: Dict[str, int]
    sha256: Dict[str, str] = field(default_factory=dict)  # model -> sha256 of its part's bytes

    def matches(self, first_index: int, frame_ids: Sequence[str]) -> bool:
        return (self.first_index == first_index and self.frames == len(frame_ids)
                and self.first_id == frame_ids[0] and self.last_id == frame_ids[-1])


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def require_same_run(stored: RunConfig, config: RunConfig, path) -> None:
    """OutputError when a --resume's `config` differs from the interrupted run's `stored` one."""
    problems = stored.mismatches(config)
    if problems:
        raise OutputError(f"--resume: {path} was started with other options or input; " + "; ".join(problems))


class OutputDir:
    """One run's output directory: opened fresh or for resume, then committed block by block."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config: Optional[RunConfig] = None
        self.manifest: Dict[int, BlockRecord] = {}       # every committed block (resume)
        self.missing: Dict[int, Tuple[str, ...]] = {}    # committed blocks -> models without part
        self.corrupt: Dict[Tuple[int, str], str] = {}    # (block, model) -> what is wrong
        self._lock_fh = None

    # ------------------------------------------------------------ opening

    def check(self, resume: bool) -> None:
        """Fail early (before any server is contacted) when the directory cannot be used."""
        if resume:
            if not (self.path / RUN_FILE).exists():
                raise OutputError(f"--resume: {self.path} holds no interrupted run "
                                  f"(no {RUN_FILE}); run without --resume to start one")
        elif self.path.exists() and (not self.path.is_dir() or any(
                p.name != STDIN_FILE for p in self.path.iterdir())):
            ours = [n for n in (RUN_FILE, MANIFEST_FILE, SUMMARY_FILE) if (self.path / n).exists()]
            hint = ("it holds a run: pass --resume to continue it, or remove it"
                    if ours else "choose an empty or new directory")
            raise OutputError(f"output directory {self.path} is not empty; {hint}")
        self._require_writable(resume)

    def _require_writable(self, resume: bool) -> None:
        """OutputNotWritable when the directory (or, while it does not exist, the nearest
        existing folder above it) cannot be written: said before any server is contacted."""
        where = self.path
        while not where.exists() and where.parent != where:
            where = where.parent
        if not where.is_dir():
            raise OutputNotWritable.at(self.path, where, "is not a directory", resume)
        if not os.access(where, os.W_OK | os.X_OK):
            raise OutputNotWritable.at(self.path, where, "is not writable", resume)

    def open(self, config: RunConfig, resume: bool) -> None:
        """Start a new run in an empty/new directory, or take up the one there (`resume`)."""
        run_file = self.path / RUN_FILE
        self.check(resume)
        try:
            self._open(config, resume, run_file)
        except OSError as e:  # what the check could not foresee (e.g. a read-only file system)
            if resume or (self.path / MANIFEST_FILE).exists():
                raise OutputWriteError.resumable("opening the run", self.path, e) from None
            raise OutputNotWritable.at(self.path, self.path, e.strerror or str(e)) from None

    def _open(self, config: RunConfig, resume: bool, run_file: Path) -> None:
        if resume:
            self._lock()
            stored = RunConfig.from_json(json.loads(run_file.read_text()))
            require_same_run(stored, config, self.path)
            self.config = stored
            self.manifest = self._read_manifest()
            self._check_parts()
            self._drop_orphan_parts()
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        self.config = config
        _write_json_atomic(run_file, config.to_json())
        (self.path / MANIFEST_FILE).touch()

    def _check_parts(self) -> None:
        """Every committed part against its checksum: one missing or corrupted is recomputed."""
        for number, record in self.manifest.items():
            missing = []
            for model in record.rows:
                problem = part_problem(self.part_path(model, number), record.sha256.get(model))
                if problem is None:
                    continue
                missing.append(model)
                if problem != "missing":
                    self.corrupt[(number, model)] = problem
                    log.warning("block %d: the %s part %s is %s; it is recomputed", number,
                                model, self.part_path(model, number), problem)
            if missing:
                self.missing[number] = tuple(missing)

    def _lock(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fh = open(self.path / ".lock", "w")
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise OutputError(f"{self.path} is in use by another embed-client") from e

    def close(self) -> None:
        if self._lock_fh is not None:
            (self.path / ".lock").unlink(missing_ok=True)
            self._lock_fh.close()
            self._lock_fh = None

    def _read_manifest(self) -> Dict[int, BlockRecord]:
        blocks: Dict[int, BlockRecord] = {}
        path = self.path / MANIFEST_FILE
        if not path.exists():
            return blocks
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = BlockRecord(**json.loads(line))
            except (ValueError, TypeError) as e:
                if number == len(lines):  # a line cut by a crash while appending
                    log.warning("ignoring the truncated last line of %s", path)
                    continue
                raise OutputError(f"{path}:{number}: unreadable manifest line ({e})") from e
            blocks[record.block] = record  # a block committed again: its last line wins
        return blocks

    @property
    def blocks(self) -> Dict[int, BlockRecord]:
        """The committed blocks that have all their parts (the manifest less `missing`)."""
        return {n: r for n, r in self.manifest.items() if n not in self.missing}

    def committed_rows(self, models: Sequence[str]) -> Dict[str, int]:
        """Rows per model in the committed blocks that have all their parts."""
        return {m: sum(r.rows.get(m, 0) for r in self.blocks.values()) for m in models}

    @property
    def parts_removed(self) -> bool:
        """The run wrote its final files and removed its parts (no parts/ left)."""
        return bool(self.manifest) and not (self.path / PARTS_DIR).exists()

    def _drop_orphan_parts(self) -> None:
        parts = self.path / PARTS_DIR
        if not parts.exists():
            return
        keep = {self.part_path(m, b.block) for b in self.manifest.values() for m in b.rows}
        for part in parts.rglob("*"):
            if part.is_file() and part not in keep:
                part.unlink()

    # ------------------------------------------------------------ committing

    def part_path(self, model: str, block: int) -> Path:
        return self.path / PARTS_DIR / model / f"block-{block:08d}.parquet"

    def commit(self, block: int, first_index: int, frame_ids: Sequence[str],
               tables: Dict[str, Tuple[np.ndarray, List[int]]],
               models: Optional[Sequence[str]] = None) -> BlockRecord:
        """Write one block: per model, embeddings [n, hidden] and lengths, in `frame_ids` order.

        `models`: every model the block has once these parts are written (default: those of
        `tables`); more when only the missing parts of a committed block were recomputed.
        """
        import pyarrow.parquet as pq

        previous = self.manifest.get(block)
        sums = dict(previous.sha256) if previous is not None else {}
        for model, data in tables.items():  # (embeddings, lengths), or a part table built
            table = data if not isinstance(data, tuple) else embedding_table(  # by representations
                frame_ids, data[0], data[1], embedding_schema(data[0].shape[1]))
            final = self.part_path(model, block)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(final.name + ".partial")
            pq.write_table(table, tmp, compression="none")
            sums[model] = file_sha256(tmp)
            os.replace(tmp, final)
        names = tuple(models or tables)
        record = BlockRecord(block, first_index, len(frame_ids), frame_ids[0], frame_ids[-1],
                             {model: len(frame_ids) for model in names},
                             {model: sums[model] for model in names if model in sums})
        with open(self.path / MANIFEST_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(asdict(record)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.manifest[block] = record
        self.missing.pop(block, None)
        for model in tables:
            self.corrupt.pop((block, model), None)
        return record

    # ------------------------------------------------------------ finishing

    def final_path(self, model: str) -> Path:
        return self.path / f"{model}.parquet"

    def finalize(self, models: Sequence[str], hidden: Dict[str, int], merged: bool,
                 on_features: Optional[Callable[[List[str], np.ndarray], None]] = None
                 ) -> Dict[str, int]:
        """Stream the committed blocks, in order, into the final files; returns rows per file.

        `on_features(ids, features)` receives each block's merged DNABERT-S + ESM-2 features
        (the classifier). Each part is checked against its checksum as it is read: a corrupted
        one stops the run before any final or derived file is in place (OutputWriteError; a
        --resume recomputes it). Parts are removed once every final file is in place.
        """
        def tables():
            for number, record in sorted(self.blocks.items()):
                yield number, {m: read_part(self.part_path(m, number), record.sha256.get(m))
                               for m in models}

        try:
            rows = self._write_finals(tables(), models, hidden, merged, on_features)
        except CorruptPart as e:
            raise OutputWriteError(f"{e}: it changed after it was committed, so no final file "
                                   f"was written; continue with --resume --out {self.path} to "
                                   f"recompute it") from None
        shutil.rmtree(self.path / PARTS_DIR, ignore_errors=True)
        return rows

    def derive(self, hidden: Dict[str, int], merged: bool,
               on_features: Optional[Callable[[List[str], np.ndarray], None]] = None,
               batch_rows: int = 8192) -> Dict[str, int]:
        """merged.parquet and/or `on_features` from the final per-model files of a finished
        run (its parts are gone); the per-model files are only read. Returns rows written."""
        import pyarrow.parquet as pq

        readers = {m: pq.ParquetFile(self.final_path(m)) for m in MERGE_ORDER}

        def tables():
            batches = {m: r.iter_batches(batch_size=batch_rows) for m, r in readers.items()}
            for number, chunk in enumerate(aligned(batches)):
                yield f"rows from {number * batch_rows}", chunk

        return self._write_finals(tables(), (), hidden, merged, on_features)

    def _write_finals(self, tables, models: Sequence[str], hidden: Dict[str, int], merged: bool,
                      on_features) -> Dict[str, int]:
        """Write `<model>.parquet` for `models` and merged.parquet (`merged`) from (label,
        {model: table}) in frame order, all as *.partial renamed at the end."""
        import pyarrow.parquet as pq

        meta = {"sample": self.config.sample, "chunk": str(self.config.chunk)}
        writers, temps, rows = {}, {}, {}
        targets = {model: self.final_path(model) for model in models}
        need_features = merged or on_features is not None
        if need_features:
            width = sum(hidden[m] for m in MERGE_ORDER)
        if merged:
            targets["merged"] = self.path / MERGED_FILE
        try:
            for name, target in targets.items():
                temps[name] = target.with_name(target.name + ".partial")
                rows[name] = 0
            for model in models:
                schema = embedding_schema(hidden[model], {**meta, "model": model,
                                                          "hidden": str(hidden[model])})
                writers[model] = pq.ParquetWriter(temps[model], schema)
            if merged:
                schema = embedding_schema(width, {**meta, "models": ",".join(MERGE_ORDER),
                                                  "hidden": str(width)})
                writers["merged"] = pq.ParquetWriter(temps["merged"], schema)
            for label, block in tables:
                for model in models:
                    table = block[model].replace_schema_metadata(writers[model].schema.metadata)
                    writers[model].write_table(table)
                    rows[model] += table.num_rows
                if not need_features:
                    continue
                ids = block[MERGE_ORDER[0]].column("id").to_pylist()
                for model in MERGE_ORDER[1:]:
                    if block[model].column("id").to_pylist() != ids:
                        raise OutputError(f"block {label}: the models' frame ids differ")
                features = np.hstack([vectors(block[m]) for m in MERGE_ORDER])
                if merged:
                    lengths = block[MERGE_ORDER[0]].column("length").to_numpy()
                    writers["merged"].write_table(
                        embedding_table(ids, features, lengths, writers["merged"].schema))
                    rows["merged"] += len(ids)
                if on_features is not None:
                    on_features(ids, features)
            for writer in writers.values():
                writer.close()
            writers.clear()
            for name, target in targets.items():
                os.replace(temps[name], target)
        except BaseException:
            for writer in writers.values():
                writer.close()
            for tmp in temps.values():
                if tmp.exists():
                    tmp.unlink()
            raise
        return rows

    def final_rows(self, name: str, hidden: Optional[int] = None) -> Optional[int]:
        """Rows of the final file `name` (a model or "merged") from its footer; None when it
        is absent, unreadable, or its embeddings are not `hidden` wide."""
        import pyarrow.parquet as pq

        path = self.path / MERGED_FILE if name == "merged" else self.final_path(name)
        try:
            footer = pq.ParquetFile(path)
            if hidden is not None and footer.schema_arrow.field("embedding").type.list_size != hidden:
                return None
            return footer.metadata.num_rows
        except (OSError, ValueError, KeyError, AttributeError):
            return None

    def write_summary(self, summary: dict) -> None:
        _write_json_atomic(self.path / SUMMARY_FILE, summary)
