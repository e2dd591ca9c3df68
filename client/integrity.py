"""Content fingerprints: what makes a run verifiable.

- The sample is identified by the sha256 of its bytes (streamed), not its size: a --resume
  (or a finished run) with another file of the same size is refused, naming both.
- Each committed part carries the sha256 of its bytes in the manifest; parts are checked on
  --resume (a part that fails is recomputed, and the run says so) and again as they are read
  for the final files, so no corrupted part reaches the final or derived outputs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

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


class CorruptPart(Exception):
    """A committed part whose bytes changed after it was written."""

    def __init__(self, path: Path, detail: str):
        super().__init__(f"{path} is corrupted ({detail})")
        self.path = path
