"""The run's record on disk, run.json (`RunConfig`) and manifest.jsonl (one `BlockRecord` per
committed block, the last line of a block winning), so that a --resume knows what the run is and
what it has committed."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import OutputError
from .integrity import short
from .layout import FORMAT_VERSION

log = logging.getLogger("embed_client.sink")   # its name when it was in sink.py


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


def require_same_run(stored: RunConfig, config: RunConfig, path) -> None:
    """OutputError when a --resume's `config` differs from the interrupted run's `stored` one."""
    problems = stored.mismatches(config)
    if problems:
        raise OutputError(f"--resume: {path} was started with other options or input; " + "; ".join(problems))


def write_json_atomic(path: Path, data: dict) -> None:
    """`data` as indented JSON at `path`, written as `.partial`, fsynced and renamed."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_manifest(path: Path) -> Dict[int, BlockRecord]:
    """Every committed block of the manifest at `path` ({} when there is none); a last line cut
    by a crash is ignored, any other unreadable line is an OutputError."""
    blocks: Dict[int, BlockRecord] = {}
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


def append_record(path: Path, record: BlockRecord) -> None:
    """One manifest line for `record`, appended and fsynced: the block is now committed."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(asdict(record)) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
