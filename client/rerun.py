"""--resume reuses the first run's options: what defines a run's content is in its run.json
(sink.RunConfig: chunk, models, window, skip_bad_records, and under "asked" --too-long,
--include, --repr-layer, --with-sequence). On --resume an option left out takes the first
run's value (the run says which, where it is not the default), an option given must equal
it (else a usage error naming both values); without --resume, or without a run.json, the
defaults apply. The parser leaves these options None when they are not given (cli.py,
plain.py), so "given" and "default" can be told apart.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

from embed_core.alphabets import MODEL_KINDS

from .layout import RUN_FILE
from .representations import parse_include

log = logging.getLogger("embed_client")


class Content(NamedTuple):
    """One content option: its flag, its default, its value in run.json, and its canonical form."""

    flag: str
    default: object
    stored: Callable[[dict], object]
    canonical: Callable[[object], object] = lambda value: value


def _asked(key: str, default):
    return lambda run: run.get("asked", {}).get(key, default)


CONTENT: Dict[str, Content] = {
    "chunk": Content("--chunk", 300, lambda run: run["chunk"]),
    "models": Content("--models", MODEL_KINDS, lambda run: tuple(run["models"]),
                      lambda value: frozenset(value)),
    "window": Content("--window", None, lambda run: run["window"]),
    "skip_bad_records": Content("--skip-bad-records", False,
                                lambda run: bool(run["skip_bad_records"]), bool),
    "too_long": Content("--too-long", "error", _asked("too_long", "error")),
    "include": Content("--include", "mean", _asked("include", "mean"), parse_include),
    "repr_layer": Content("--repr-layer", -1, _asked("repr_layer", -1), int),
    "with_sequence": Content("--with-sequence", False, _asked("with_sequence", False), bool),
}


def first_run(args) -> Optional[dict]:
    """run.json of the run in --out (default: beside the input), or None."""
    from .options import default_out

    sample = next((getattr(args, n, None) for n in ("sample", "proteins", "dna")
                   if getattr(args, n, None) is not None), None)
    out = args.out if args.out is not None else (
        default_out(Path(sample)) if sample is not None and str(sample) != "-" else None)
    if out is None:
        return None
    try:
        run = json.loads((Path(out) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return run if isinstance(run, dict) else None


def settle(args) -> List[str]:
    """Fill in `args` the content options not given: on --resume the first run's, else the
    defaults (the window's default is left to plain.schedule_defaults). ValueError: an option
    given that differs from the first run's. Returns the first run's options taken that differ
    from the defaults, as flags with values."""
    run = first_run(args) if getattr(args, "resume", False) else None
    plain = run is not None and run.get("asked", {}).get("input") is not None
    taken, conflicts = [], []
    for dest, content in CONTENT.items():
        given = getattr(args, dest, None)
        if run is None or (dest == "models" and plain):   # plain mode: its one model
            if given is None:
                setattr(args, dest, content.default)
            continue
        try:
            stored = content.stored(run)
        except (KeyError, TypeError, ValueError):
            setattr(args, dest, content.default if given is None else given)
            continue
        if given is None:
            setattr(args, dest, stored)
            if content.canonical(stored) != content.canonical(_default(dest, run)):
                taken.append(f"{content.flag} {_shown(stored)}")
        elif content.canonical(given) != content.canonical(stored):
            conflicts.append(f"{content.flag} {_shown(given)} (the first run's: "
                             f"{_shown(stored)})")
    if conflicts:
        raise ValueError(f"--resume: {', '.join(conflicts)}: a run continues with its own "
                         f"options (run.json); leave them out, or start a new run in another "
                         f"--out")
    if taken:
        log.info("resume: the first run's options (run.json): %s", ", ".join(taken))
    return taken


def _default(dest: str, run: dict):
    if dest != "window":
        return CONTENT[dest].default
    from .plain import default_window

    return default_window(parse_include(str(_asked("include", "mean")(run))))


def _shown(value) -> str:
    if isinstance(value, (tuple, list, frozenset)):
        return ",".join(value)
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)
