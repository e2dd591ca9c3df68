"""Content fingerprints: what makes a run verifiable.

- The sample is identified by the sha256 of its bytes (streamed), not its size: a --resume
  (or a finished run) with another file of the same size is refused, naming both.
- Each committed part carries the sha256 of its bytes in the manifest; parts are checked on
  --resume (a part that fails is recomputed, and the run says so) and again as they are read
  for the final files, so no corrupted part reaches the final or derived outputs.
- A finished run's output files are listed with their sha256 in checksums.sha256
  (`sha256sum -c` reads it); a --resume of the finished run checks them: a changed embedding
  file makes the run compute again, a changed derived file (merged, predictions) is written
  again when the --resume asks for it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .layout import LOCK_FILE, MANIFEST_FILE, RUN_FILE, SUMMARY_FILE

log = logging.getLogger("embed_client.sink")   # the resume checks' messages, as when in sink.py

CHUNK_BYTES = 1 << 20


def file_sha256(path: Path) -> str:
    """The sha256 (hex) of a file's bytes, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            piece = fh.read(CHUNK_BYTES)
            if not piece:
                return digest.hexdigest()
            digest.update(piece)


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def short(digest: Optional[str]) -> str:
    """The first 16 hex digits, enough to tell two files apart in a message."""
    return "?" if not digest else digest[:16]


def part_problem(path: Path, expected: Optional[str]) -> Optional[str]:
    """None when the part at `path` exists and matches `expected` (no checksum recorded, as in
    a manifest written before checksums: only its existence is checked); else what is wrong."""
    try:
        if expected is None:
            return None if path.is_file() else "missing"
        found = file_sha256(path)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if found != expected:
        return f"corrupted (sha256 {short(found)}, the manifest says {short(expected)})"
    return None


def read_part(path: Path, expected: Optional[str]):
    """The Arrow table of a committed part, read once and checked against its checksum;
    `CorruptPart` when the bytes are not those committed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = path.read_bytes()
    if expected is not None:
        found = bytes_sha256(data)
        if found != expected:
            raise CorruptPart(path, f"sha256 {short(found)}, the manifest says {short(expected)}")
    return pq.read_table(pa.BufferReader(data))


def check_parts(manifest: Mapping[int, object], part_path: Callable[[str, int], Path]
                ) -> Tuple[Dict[int, Tuple[str, ...]], Dict[Tuple[int, str], str]]:
    """Every committed part (manifest: block -> BlockRecord) against its checksum, on --resume:
    (block -> models whose part is missing or corrupted: recomputed, (block, model) -> what is
    wrong with a corrupted one)."""
    missing_by_block: Dict[int, Tuple[str, ...]] = {}
    corrupt: Dict[Tuple[int, str], str] = {}
    for number, record in manifest.items():
        missing = []
        for model in record.rows:
            problem = part_problem(part_path(model, number), record.sha256.get(model))
            if problem is None:
                continue
            missing.append(model)
            if problem != "missing":
                corrupt[(number, model)] = problem
                log.warning("block %d: the %s part %s is %s; it is recomputed", number,
                            model, part_path(model, number), problem)
        if missing:
            missing_by_block[number] = tuple(missing)
    return missing_by_block, corrupt


class CorruptPart(Exception):
    """A committed part whose bytes changed after it was written."""

    def __init__(self, path: Path, detail: str):
        super().__init__(f"{path} is corrupted ({detail})")
        self.path = path


# ------------------------------------------------------------------ the final files

CHECKSUMS_FILE = "checksums.sha256"
# The run's bookkeeping (layout.py's names), not outputs: never in CHECKSUMS_FILE.
BOOKKEEPING = {RUN_FILE, MANIFEST_FILE, SUMMARY_FILE, CHECKSUMS_FILE, LOCK_FILE}


def output_files(out: Path) -> List[str]:
    """The finished run's output files: every file at the top of `out` but its bookkeeping."""
    return sorted(p.name for p in Path(out).iterdir() if p.is_file()
                  and p.name not in BOOKKEEPING and not p.name.endswith(".partial"))


def read_checksums(out: Path) -> Dict[str, str]:
    """{file name: sha256} from CHECKSUMS_FILE (`sha256sum` format); {} when there is none."""
    recorded = {}
    try:
        lines = (Path(out) / CHECKSUMS_FILE).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return recorded
    for line in lines:
        digest, _, name = line.partition("  ")
        if len(digest) == 64 and name:
            recorded[name] = digest
    return recorded


def write_checksums(out: Path, names: Optional[Sequence[str]] = None) -> None:
    """CHECKSUMS_FILE for `names` (default: all output files, anew; else only those updated),
    checkable with `sha256sum -c checksums.sha256` in `out`."""
    out = Path(out)
    recorded = {} if names is None else read_checksums(out)
    for name in output_files(out) if names is None else names:
        recorded[name] = file_sha256(out / name)
    tmp = out / (CHECKSUMS_FILE + ".partial")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(f"{digest}  {name}\n" for name, digest in sorted(recorded.items()))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out / CHECKSUMS_FILE)


def changed_files(out: Path, names: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """{name: what is wrong} for the recorded files (of `names`, default all) that exist and
    no longer match their checksum (a file that is gone is left to the caller's checks)."""
    out, changed = Path(out), {}
    for name, digest in read_checksums(out).items():
        if names is not None and name not in names:
            continue
        try:
            found = file_sha256(out / name)
        except FileNotFoundError:
            continue
        except OSError as e:
            changed[name] = f"is unreadable ({e.strerror or e})"
            continue
        if found != digest:
            changed[name] = (f"changed since the run wrote it (sha256 {short(found)}, "
                             f"{CHECKSUMS_FILE} says {short(digest)})")
    return changed
