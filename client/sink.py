"""The output directory: Parquet parts committed atomically, a resume manifest, final files.

The directory's file names are in layout.py, run.json and manifest.jsonl's records in
manifest.py, the final files' writing in finals.py; `OutputDir` opens the directory (new or
for --resume), commits each block's parts and manifest line, and hands over to finals.py.

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
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import finals
from .errors import OutputError, OutputNotWritable, OutputWriteError
from .integrity import bytes_sha256, check_parts
# The names other modules and tests import from here (layout.py, manifest.py hold them).
from .layout import (FORMAT_VERSION, LOCK_FILE, MANIFEST_FILE, MERGE_ORDER,  # noqa: F401
                     MERGED_FILE, PARTS_DIR, RUN_FILE, STDIN_FILE, SUMMARY_FILE)
from .manifest import (BlockRecord, RunConfig, append_record, read_manifest,  # noqa: F401
                       require_same_run, write_json_atomic)
from .tables import embedding_schema, embedding_table


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
            self.manifest = read_manifest(self.path / MANIFEST_FILE)
            self.missing, self.corrupt = check_parts(self.manifest, self.part_path)
            self._drop_orphan_parts()
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        self.config = config
        write_json_atomic(run_file, config.to_json())
        (self.path / MANIFEST_FILE).touch()

    def _lock(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fh = open(self.path / LOCK_FILE, "w")
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise OutputError(f"{self.path} is in use by another embed-client") from e

    def close(self) -> None:
        if self._lock_fh is not None:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            self._lock_fh.close()
            self._lock_fh = None

    def _drop_orphan_parts(self) -> None:
        parts = self.path / PARTS_DIR
        if not parts.exists():
            return
        keep = {self.part_path(m, b.block) for b in self.manifest.values() for m in b.rows}
        for part in parts.rglob("*"):
            if part.is_file() and part not in keep:
                part.unlink()

    # ------------------------------------------------------------ the committed blocks

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

    def part_path(self, model: str, block: int) -> Path:
        return self.path / PARTS_DIR / model / f"block-{block:08d}.parquet"

    def commit(self, block: int, first_index: int, frame_ids: Sequence[str],
               tables: Dict[str, Tuple[np.ndarray, List[int]]],
               models: Optional[Sequence[str]] = None) -> BlockRecord:
        """Write one block: per model, embeddings [n, hidden] and lengths, in `frame_ids` order.

        `models`: every model the block has once these parts are written (default: those of
        `tables`); more when only the missing parts of a committed block were recomputed.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        previous = self.manifest.get(block)
        sums = dict(previous.sha256) if previous is not None else {}
        for model, data in tables.items():  # (embeddings, lengths), or a part table built
            table = data if not isinstance(data, tuple) else embedding_table(  # by representations
                frame_ids, data[0], data[1], embedding_schema(data[0].shape[1]))
            final = self.part_path(model, block)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(final.name + ".partial")
            buffer = pa.BufferOutputStream()  # hashed in memory, not read back from disk
            pq.write_table(table, buffer, compression="none")
            encoded = buffer.getvalue().to_pybytes()
            sums[model] = bytes_sha256(encoded)
            tmp.write_bytes(encoded)
            os.replace(tmp, final)
        names = tuple(models or tables)
        record = BlockRecord(block, first_index, len(frame_ids), frame_ids[0], frame_ids[-1],
                             {model: len(frame_ids) for model in names},
                             {model: sums[model] for model in names if model in sums})
        append_record(self.path / MANIFEST_FILE, record)
        self.manifest[block] = record
        self.missing.pop(block, None)
        for model in tables:
            self.corrupt.pop((block, model), None)
        return record

    # ------------------------------------------------------------ finishing (finals.py)

    def final_path(self, model: str) -> Path:
        return self.path / f"{model}.parquet"

    def finalize(self, models: Sequence[str], hidden: Dict[str, int], merged: bool,
                 on_features: Optional[Callable[[List[str], np.ndarray], None]] = None
                 ) -> Dict[str, int]:
        """The final files of a run of means from its committed blocks (finals.finalize_means);
        rows per file. The parts are removed once every final file is in place."""
        return finals.finalize_means(self, models, hidden, merged, on_features)

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
        write_json_atomic(self.path / SUMMARY_FILE, summary)
