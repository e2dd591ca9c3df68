"""Plain mode: a protein FASTA to ESM-2 (`--proteins`) or a DNA FASTA to DNABERT-S (`--dna`).

No chunking, no translation: each record is one sequence, keyed by its record id, through the
same streaming, bucketing, servers, retries, --resume and counts as a sample (`--sample`). The
longest sequence a model takes is the server's `max_length` config parameter (letters; "auto"
or unreadable: ESM-2 1022 residues as fair-esm, DNABERT-S 10,000 bp). A longer record is, by
`--too-long`:
- error (default): the run stops before anything is sent, naming the records;
- truncate: its first max_length letters are embedded (fair-esm's truncation_seq_length);
- windows (DNA only): consecutive windows of max_length bp (the last shorter), ids
  `<id>_w<offset>` with the 0-based offset of the window's first base.
Each truncated or windowed record is listed in too_long.tsv and summary.json ("plain").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from embed_core.alphabets import DEFAULT_MAX_LENGTH, ESM_RESIDUES

from . import reader
from .errors import InputError, InputProblem
from .progress import Counters
from .options import PLAIN_INPUTS
from .report import LISTED, Report
from .virnucpro import PrepStats

log = logging.getLogger("embed_client")

UNIT = {"proteins": "residues", "dna": "bp"}
TOO_LONG_FILE = "too_long.tsv"
PER_TOKEN_WINDOW = 256          # default --window with per-token rows (they fill the memory)
PER_TOKEN_BUDGET = 8192         # default --token-budget with per-token rows (answer size)


def alphabet(plain: Optional[str]) -> reader.Alphabet:
    """The letters the input may hold: ESM-2's residues for --proteins, IUPAC otherwise."""
    if plain == "proteins":
        return reader.Alphabet.of(ESM_RESIDUES, "ESM-2 residue letters")
    return reader.NUCLEOTIDES


def asked(options) -> Dict[str, object]:
    """What the run asks beyond a sample run's defaults (run.json: a --resume must match)."""
    out: Dict[str, object] = {}
    if options.plain:
        out.update(input=options.plain, too_long=options.too_long)
    if tuple(options.include) != ("mean",):
        out["include"] = ",".join(options.include)
    if options.layer != -1:
        out["repr_layer"] = options.layer
    if options.with_sequence:
        out["with_sequence"] = True
    return out


def max_lengths(servers, models: Sequence[str]) -> Dict[str, int]:
    """The longest sequence per model: the servers' max_length parameter (the smallest), else
    the model's default."""
    limits = {}
    for model in models:
        values = [s.models[model].max_length for s in servers
                  if model in s.models and s.models[model].max_length]
        limits[model] = min(values) if values else DEFAULT_MAX_LENGTH[model]
    return limits


async def check_asked(servers, options) -> None:
    """Before anything is sent: ServerError when a server's model lacks an output the run asks
    for (an older server), OptionError when it refuses what the run asks (e.g. a --repr-layer
    the model has not): one four-letter request per model to the first server says so."""
    from tritonclient.utils import InferenceServerException

    from .errors import OptionError, ServerError
    from .representations import Ask
    from .schedule import Item, Request
    from .transport import PROBE_SEQUENCE, is_rejection

    ask = Ask.of(options.include, options.layer)
    if ask is None or not servers:
        return
    for server in servers:
        for model in options.models:
            missing = ask.missing_outputs(server.models[model].outputs)
            if missing:
                raise ServerError(f"server {server.spec.url}: model {model} has no output "
                                  f"{', '.join(missing)} (asked by --include "
                                  f"{','.join(options.include)}); update the server")
    for model in options.models:
        probe = Request(model, -1, [Item(-1, "probe", PROBE_SEQUENCE)])
        try:
            await servers[0].embed(probe, ask)
        except InferenceServerException as e:
            if not is_rejection(e):
                raise ServerError(f"server {servers[0].spec.url}: model {model}: {e}") from None
            raise OptionError(f"server {servers[0].spec.url}: model {model} refuses --include "
                              f"{','.join(options.include)} --repr-layer {options.layer}: "
                              f"{e.message() or e}") from None


def check_lengths(validated: reader.ValidatedInput, plain: str, limit: int) -> None:
    """--too-long error: InputError naming the records over `limit` (before anything is sent)."""
    model, unit = PLAIN_INPUTS[plain], UNIT[plain]
    hint = "--too-long truncate embeds the first %d" % limit + (
        f", --too-long windows embeds windows of {limit} bp" if plain == "dna" else "")
    problems: List[InputProblem] = []
    total = 0
    for record in validated.records():
        if len(record.sequence) > limit:
            total += 1
            if len(problems) < reader.MAX_LISTED:
                problems.append(InputProblem(
                    str(validated.path), record.id, None,
                    f"{len(record.sequence):,} {unit}, over {model}'s maximum of {limit:,} "
                    f"(the server's max_length); {hint}"))
    if problems:
        raise InputError.from_problems(problems, total)


class TooLong(NamedTuple):
    """A record longer than the model's maximum, and what was embedded of it."""

    id: str
    length: int
    action: str          # "truncated" or "windows"
    sequences: int       # sequences embedded for it (1 when truncated)
    kept: int            # letters embedded (all of them in windows)


class PlainPrep:
    """Records -> (id, {model: text}) under the --too-long policy, counted like VirNucPro's prep
    (records, bases; one "frame" per sequence sent)."""

    def __init__(self, plain: str, too_long: str, limit: int, stats: PrepStats,
                 counters: Counters):
        self.plain, self.too_long, self.limit = plain, too_long, limit
        self.model = PLAIN_INPUTS[plain]
        self.stats, self.counters = stats, counters
        self.long: List[TooLong] = []

    def items(self, records: Iterable[reader.Record]) -> Iterator[Tuple[str, Dict[str, str]]]:
        stats, counters = self.stats, self.counters
        for record in records:
            stats.records += 1
            stats.bases += len(record.sequence)
            for seq_id, text in self._pieces(record):
                stats.frames += 1
                if self.plain == "proteins":
                    stats.residues += len(text)
                yield seq_id, {self.model: text}
            counters.records_read = stats.records
            counters.frames_prepped = stats.frames
        counters.prep_done = True

    def _pieces(self, record: reader.Record) -> List[Tuple[str, str]]:
        sequence, limit = record.sequence, self.limit
        if len(sequence) <= limit:
            return [(record.id, sequence)]
        if self.too_long == "truncate":
            self.long.append(TooLong(record.id, len(sequence), "truncated", 1, limit))
            return [(record.id, sequence[:limit])]
        if self.too_long == "windows":
            pieces = [(f"{record.id}_w{offset}", sequence[offset:offset + limit])
                      for offset in range(0, len(sequence), limit)]
            self.long.append(TooLong(record.id, len(sequence), "windows", len(pieces),
                                     len(sequence)))
            return pieces
        raise InputError("input", record.id, None,
                         f"{len(sequence):,} letters, over {self.model}'s maximum of {limit:,}")

    def describe(self) -> dict:
        """summary.json's "plain": the policy and the first LISTED records it applied to."""
        return {"input": self.plain, "model": self.model, "max_length": self.limit,
                "too_long": self.too_long, "records_too_long": len(self.long),
                "too_long_records": [r._asdict() for r in self.long[:LISTED]]}

    def write_tsv(self, out: Path) -> None:
        if not self.long:
            return
        with open(out / TOO_LONG_FILE, "w", encoding="utf-8") as fh:
            fh.write("record_id\tlength\taction\tsequences\tletters_embedded\n")
            for r in self.long:
                fh.write(f"{r.id}\t{r.length}\t{r.action}\t{r.sequences}\t{r.kept}\n")


@dataclass
class PlainReport(Report):
    """The report of a plain-mode run, or of one that asks more than the means: summary.json
    says what was asked, the too-long records, and the per-token files' counts."""

    plain: Optional[PlainPrep] = None

    def summary(self, status, message, final_rows=None, predictions=None) -> dict:
        summary = super().summary(status, message, final_rows, predictions)
        options = self.options
        summary["include"] = list(options.include)
        summary["repr_layer"] = options.layer
        for name, rows in (final_rows or {}).items():
            if name not in options.models and name != "merged":
                summary["stages"]["write"][name] = {"rows_final": rows}
        if self.plain is not None:
            summary["plain"] = self.plain.describe()
        return summary

    def write(self, status, message, final_rows=None, predictions=None) -> dict:
        if self.plain is not None:
            self.plain.write_tsv(self.options.out)
        return super().write(status, message, final_rows, predictions)


# ------------------------------------------------------------------------------ command line

def add_input_arguments(inputs) -> None:
    """--proteins and --dna, in the group that holds --sample (exactly one of them)."""
    inputs.add_argument("--proteins", type=Path, default=None, metavar="FASTA",
                        help="plain mode: one ESM-2 embedding per protein record (ids = record "
                        "ids), no chunking or translation; letters: ESM-2's residues; '-': "
                        "standard input (no default)")
    inputs.add_argument("--dna", type=Path, default=None, metavar="FASTA",
                        help="plain mode: one DNABERT-S embedding per DNA record (ids = record "
                        "ids), no chunking; U read as T; '-': standard input (no default)")


def add_output_arguments(parser) -> None:
    """--too-long, --include, --repr-layer, --with-sequence."""
    group = parser.add_argument_group("plain mode and what to return")
    group.add_argument("--too-long", choices=("error", "truncate", "windows"), default=None,
                       help="a --proteins/--dna record over the model's maximum (the server's "
                       "max_length: ESM-2 1022 residues, DNABERT-S 10,000 bp by default): error "
                       "(naming it, nothing sent), truncate (its first max_length letters, as "
                       "fair-esm), windows (--dna: windows of max_length bp, ids "
                       "<id>_w<offset>); listed in too_long.tsv and summary.json (default: error)")
    group.add_argument("--include", default=None,
                       help="comma-separated: mean (always), bos (first token's row: a bos "
                       "column), per_token (every token the mean averages, into "
                       "<model>.per_token.h5: one dataset per sequence) (default: mean)")
    group.add_argument("--repr-layer", type=int, default=None, metavar="N",
                       help="representation layer, as fair-esm's repr_layers: 0 = the "
                       "embeddings, k = after k layers, -1 = the last, -2 = one before "
                       "(default: -1)")
    group.add_argument("--with-sequence", action="store_true", default=None,
                       help="add a sequence column (the letters embedded) to <model>.parquet")


def options_from_args(args) -> dict:
    """RunOptions fields for the input and what to return (ValueError: a usage error)."""
    from .representations import parse_include

    plain = next((name for name in PLAIN_INPUTS if getattr(args, name, None) is not None), None)
    include = parse_include(_given(args, "include", "mean"))
    return dict(sample=getattr(args, plain) if plain else args.sample, plain=plain,
                too_long=_given(args, "too_long", "error"), include=include,
                layer=_given(args, "repr_layer", -1),
                with_sequence=bool(_given(args, "with_sequence", False)))


def _given(args, name: str, default):
    """An option's value, or its default when not given (None: rerun.py fills it on --resume)."""
    value = getattr(args, name, None)
    return default if value is None else value


def default_window(include: Sequence[str]) -> int:
    """The default --window: smaller when per-token rows are asked (a block's rows are held
    until it is committed)."""
    from .schedule import ScheduleConfig

    return PER_TOKEN_WINDOW if "per_token" in include else ScheduleConfig().window


def schedule_defaults(args, include: Sequence[str]) -> Tuple[int, int]:
    """(window, token budget): as given, else smaller ones when per-token rows are asked (a
    block's rows are held until it is committed; an answer holds its sequences' rows)."""
    from .schedule import ScheduleConfig

    per_token, defaults = "per_token" in include, ScheduleConfig()
    window = args.window or default_window(include)
    budget = args.token_budget or (PER_TOKEN_BUDGET if per_token else defaults.token_budget)
    return window, budget
