"""What one embed-client run is asked to do (RunOptions, built by the CLI) and what it did (RunResult)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

from embed_core.alphabets import MODEL_KINDS

from .representations import INCLUDE_CHOICES
from .schedule import ScheduleConfig
from .layout import MERGE_ORDER
from .transport import ServerSpec, TransportConfig

PLAIN_INPUTS = {"proteins": "esm2", "dna": "dnabert_s"}       # option -> the one model it runs
TOO_LONG = {"proteins": ("error", "truncate"), "dna": ("error", "truncate", "windows")}

CHUNK_SIZES = (300, 500)


@dataclass(frozen=True)
class RunOptions:
    """Everything one run needs; built by the CLI, usable from tests."""

    sample: Path
    servers: Tuple[ServerSpec, ...]
    out: Optional[Path] = None                 # None: <sample stem>_embeddings beside the sample
    chunk: int = 300
    models: Tuple[str, ...] = MODEL_KINDS
    skip_bad_records: bool = False
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    resume: bool = False
    merged: bool = False
    classifier: Optional[Path] = None
    allow_pickle: bool = False
    tty: Optional[bool] = None                 # None: rich view when stdout is a terminal
    log_interval: float = 10.0
    silence_warning: float = 60.0              # warn after this many s without an answer; 0: never
    resolve_every: float = 30.0                # s between lookups of server names; 0: once
    plain: Optional[str] = None                # "proteins" | "dna": plain mode (plain.py)
    too_long: str = "error"                    # plain mode: error | truncate | windows (dna)
    include: Tuple[str, ...] = ("mean",)       # mean, bos, per_token (representations.py)
    layer: int = -1                            # representation layer (fair-esm's repr_layers)
    with_sequence: bool = False                # a sequence column in <model>.parquet

    def __post_init__(self):
        object.__setattr__(self, "sample", Path(self.sample))
        if self.out is None:
            if str(self.sample) == "-":
                raise ValueError(f"--{self.plain or 'sample'} - reads standard input: give --out "
                                 f"DIR (the input is spooled there first, for its sha256 and "
                                 f"--resume)")
            object.__setattr__(self, "out", default_out(self.sample))
        object.__setattr__(self, "out", Path(self.out))
        settle(self)   # plain mode runs its one model; checks --too-long, --include
        unknown = [m for m in self.models if m not in MODEL_KINDS]
        if unknown or not self.models:
            raise ValueError(f"models must be a non-empty subset of {MODEL_KINDS}, got {self.models}")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models listed twice: {self.models}")
        # One canonical order (VirNucPro's: nucleotide first), whatever order was given.
        object.__setattr__(self, "models",
                           tuple(m for m in MERGE_ORDER if m in self.models))
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")
        if not self.servers:
            raise ValueError("at least one server is needed")
        if not self.silence_warning >= 0:
            raise ValueError(f"--silence-warning must be >= 0, got {self.silence_warning}")
        if not self.resolve_every >= 0:
            raise ValueError(f"resolve_every must be >= 0, got {self.resolve_every}")
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


def settle(options) -> None:
    """RunOptions' plain-mode and output checks (ValueError: a usage error); plain mode runs
    its one model."""
    object.__setattr__(options, "include", tuple(options.include))
    if not set(options.include) <= set(INCLUDE_CHOICES) or "mean" not in options.include:
        raise ValueError(f"include must hold mean and a subset of {INCLUDE_CHOICES}, "
                         f"got {options.include}")
    if "per_token" in options.include and importlib.util.find_spec("h5py") is None:
        raise ValueError("--include per_token writes HDF5 files: install h5py "
                         "(pip install h5py, or the client extra)")
    if options.plain is None:
        if options.too_long != "error":
            raise ValueError("--too-long applies to --proteins and --dna")
        return
    if options.plain not in PLAIN_INPUTS:
        raise ValueError(f"plain must be one of {tuple(PLAIN_INPUTS)}, got {options.plain!r}")
    if options.too_long not in TOO_LONG[options.plain]:
        raise ValueError(f"--too-long {options.too_long}: --{options.plain} takes "
                         f"{', '.join(TOO_LONG[options.plain])}")
    if options.merged or options.classifier:
        raise ValueError("--merged and --classifier are VirNucPro's (--sample); plain mode "
                         f"(--{options.plain}) runs one model")
    object.__setattr__(options, "models", (PLAIN_INPUTS[options.plain],))
