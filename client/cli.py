"""embed-client: a FASTA/FASTQ sample -> VirNucPro frames -> Triton embeddings -> Parquet."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from embed_core.alphabets import MODEL_KINDS

from . import plain, rerun
from .credentials import (API_KEY_ENV, API_KEY_FILE_ENV, check_ca_file, check_client_certificate,
                          env_path, read_api_key)
from .errors import (ClassifierError, ClientError, IncompleteError, InputError, InterruptedRun, OptionError,
                     OutputError, OutputWriteError, ServerError)
from .layout import RUN_FILE
from .options import CHUNK_SIZES, RunOptions
from .run import execute
from .schedule import ScheduleConfig
from .transport import ServerSpec, TransportConfig

EXIT_OK = 0
EXIT_FAILURE = 1       # an unexpected error (a bug): the traceback is printed
EXIT_USAGE = 2         # bad options, output directory in the way, unusable classifier file
EXIT_INPUT = 3         # bad input records or file (nothing was sent)
EXIT_SERVER = 4        # no server reachable / servers stayed down / a server error
EXIT_INCOMPLETE = 5    # counts in != counts out (e.g. sequences rejected by the server)
EXIT_OUTPUT = 6        # the output directory could not be written (full disk, permissions)
EXIT_INTERRUPTED = 130

EPILOG = f"""\
exit codes:
  {EXIT_OK}    success: every frame embedded by every model, final files written
  {EXIT_FAILURE}    unexpected error (a bug; the traceback is printed)
  {EXIT_USAGE}    usage: bad options, output directory not empty (without --resume),
       unusable --classifier file
  {EXIT_INPUT}    bad input: not FASTA/FASTQ, truncated/corrupt compressed data, empty
       record, duplicate id, letter outside the IUPAC codes (nothing sent)
  {EXIT_SERVER}    server unavailable (down past --retries) or a server error; the output
       directory can be resumed with --resume when the run had started writing it
  {EXIT_INCOMPLETE}    count mismatch: fewer embeddings out than sequences in (e.g. sequences
       rejected by the server, listed in rejected.tsv); no final files are written
  {EXIT_OUTPUT}    the output directory could not be written (e.g. a full disk: once fixed,
       continue with --resume; or not writable at all: nothing was sent)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C, SIGTERM); resumable with --resume

output directory (--out): dnabert_s.parquet, esm2.parquet (columns id, embedding
fixed_size_list<float32>[hidden], length int32; rows in input frame order),
merged.parquet (--merged: DNABERT-S then ESM-2 features), prediction_results.txt and
prediction_results_highestscore.csv (--classifier), summary.json (counts per stage),
checksums.sha256 (each output file's sha256: sha256sum -c checksums.sha256), and the
run's record, kept when it completes: run.json (the sample's sha256 and the options a
--resume takes again) and manifest.jsonl (each committed block, its parts' sha256); with
them a --resume of a finished run says "already embedded" and writes only what it lacks.
parts/ exists only while running; stdin.input is the spooled input of --sample -.
--include bos and --with-sequence add bos and sequence columns; --include per_token writes
<model>.per_token.h5 (one dataset [tokens, hidden] per id). Plain mode (--proteins: esm2,
--dna: dnabert_s) keys rows by record id; too_long.tsv lists truncated or windowed records.
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _models(text: str) -> tuple:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [n for n in names if n not in MODEL_KINDS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(MODEL_KINDS)}, got {text!r}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a model is listed twice in {text!r}")
    return names


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default said once, where it says something: not on required options, unset
    ones (None), flags (False), or help that names its own default; the epilog kept as written."""

    def __init__(self, prog):
        super().__init__(prog, width=100)

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.required or not action.option_strings or default is None or default is False
                or default == argparse.SUPPRESS or "(default" in text):
            return text
        return f"{text} (default: %(default)s)"


def version() -> str:
    """The installed virnuc-embed's version (importlib.metadata)."""
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("virnuc-embed")
    except PackageNotFoundError:
        return "unknown (virnuc-embed is not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="embed-client",
        description="Embed a FASTA/FASTQ sample (plain or compressed) with DNABERT-S and ESM-2\n"
        "on one or more Triton servers, VirNucPro style: chunks of --chunk bp, six-frame\n"
        "translation, one DNABERT-S embedding (nucleotide slice) and one ESM-2 embedding\n"
        "(protein) per frame, keyed by frame id. Optionally runs the VirNucPro classifier\n"
        "on the merged features.\n\n"
        "example: embed-client --sample S1.fasta --server localhost:8001",
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    _input_options(p)
    _server_options(p)
    _flow_options(p)
    plain.add_output_arguments(p)
    _classifier_options(p)
    _display_options(p)
    return p


def _input_options(p: argparse.ArgumentParser) -> None:
    io = p.add_argument_group("input and output")
    inputs = io.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--sample", type=Path, default=None,
                        help="input FASTA or FASTQ (.gz/.bz2/.xz/.zst accepted), VirNucPro's "
                        "prep; '-': standard input (spooled into --out first); give one of "
                        "--sample, --proteins, --dna")
    plain.add_input_arguments(inputs)
    io.add_argument("--out", type=Path, default=None,
                    help="output directory (default: <sample stem>_embeddings beside the "
                    "sample; needed when the input is standard input)")
    io.add_argument("--resume", action="store_true",
                    help="continue an interrupted run in --out: finished blocks are neither "
                    "recomputed nor duplicated, and no server is contacted unless something is "
                    "left to compute (a finished run only gets the --merged/--classifier files "
                    "it lacks); the first run's --chunk, --models, --window... are used unless "
                    "given (run.json)")
    io.add_argument("--merged", action="store_true",
                    help="also write merged.parquet: the VirNucPro features per frame, "
                    "DNABERT-S then ESM-2 (768 + 2560 = 3328 for the published models)")
    io.add_argument("--skip-bad-records", action="store_true", default=None,
                    help="skip bad records (listed in skipped.tsv and summary.json) instead "
                    "of stopping before anything is sent")
    prep = p.add_argument_group("VirNucPro prep")
    prep.add_argument("--chunk", type=int, choices=CHUNK_SIZES, default=None,
                      help="chunk length in bp (use the classifier trained for it) (default: 300)")
    prep.add_argument("--models", type=_models, default=None,
                      help=f"models to run, comma-separated subset of {','.join(MODEL_KINDS)} "
                      f"(default: {','.join(MODEL_KINDS)})")


def _server_options(p: argparse.ArgumentParser) -> None:
    srv = p.add_argument_group("servers")
    srv.add_argument("--server", dest="servers", action="append", default=None,
                     metavar="HOST[:PORT]",
                     help="Triton gRPC endpoint; repeat to spread one sample over several "
                     "servers (each pulls work as it frees up); a HOST name with several "
                     "addresses (a Kubernetes headless Service) is all of them, see "
                     "--resolve-every (default: localhost:8001)")
    srv.add_argument("--metrics-url", dest="metrics_urls", action="append", default=None,
                     metavar="URL",
                     help="Prometheus metrics URL of each --server, in the same order, for the "
                     "per-GPU figures (default: http://<server host>:<gRPC port + 1>/metrics, "
                     "embed-server's layout: 8001 -> 8002)")
    srv.add_argument("--resolve-every", type=_non_negative_float, default=30.0,
                     metavar="SECONDS",
                     help="a --server NAME that resolves to several addresses (a Kubernetes "
                     "headless Service) is one server per address; the names are resolved "
                     "again this often while the run sends, so servers that appear join and "
                     "those no longer listed leave (0: resolve once)")
    srv.add_argument("--tls", action="store_true",
                     help="gRPC over TLS (embed-server --tls-cert); the server's certificate is "
                     "checked against the system's CAs, or --tls-ca-file")
    srv.add_argument("--tls-ca-file", type=Path, default=None, metavar="PATH",
                     help="PEM CA certificate(s) that signed the servers' certificate (a "
                     "self-signed certificate is its own CA); implies --tls")
    srv.add_argument("--tls-cert-file", type=Path, default=None, metavar="PATH",
                     help="PEM client certificate for servers that require one (embed-server "
                     "--tls-client-ca: mutual TLS), with --tls-key-file; implies --tls")
    srv.add_argument("--tls-key-file", type=Path, default=None, metavar="PATH",
                     help="PEM private key of --tls-cert-file")
    srv.add_argument("--api-key-file", type=Path, default=env_path(API_KEY_FILE_ENV),
                     metavar="PATH",
                     help=f"file holding the servers' API key (embed-server --api-key-file), "
                     f"sent with every request and never shown; else ${API_KEY_ENV} "
                     f"[${API_KEY_FILE_ENV}]")


def _flow_options(p: argparse.ArgumentParser) -> None:
    defaults_s, defaults_t = ScheduleConfig(), TransportConfig()
    flow = p.add_argument_group("scheduling and faults")
    flow.add_argument("--token-budget", type=_positive_int, default=None,
                      help="estimated model tokens per request (ESM-2: residues + 2; DNABERT-S: "
                      "bp/4 + 2); the model's max_batch_size also bounds the sequences per request; "
                      f"{plain.PER_TOKEN_BUDGET} with --include per_token "
                      f"(default: {defaults_s.token_budget})")
    flow.add_argument("--window", type=_positive_int, default=None,
                      help="frames per block: sequences are length-sorted inside a block, and "
                      "a block is the unit committed to disk and skipped by --resume; "
                      f"{plain.PER_TOKEN_WINDOW} with --include per_token "
                      f"(default: {defaults_s.window})")
    flow.add_argument("--max-in-flight", type=_positive_int, default=None,
                      help="requests in flight per server (default: 8 per model instance, at "
                      "least 8)")
    flow.add_argument("--retries", type=_non_negative_int, default=defaults_t.retries,
                      help="backoff rounds (0.5 s doubling, at most 30 s) a server may stay "
                      "unavailable before it is given up")
    flow.add_argument("--timeout", type=_positive_float, default=defaults_t.timeout,
                      help="seconds per request before it is retried")
    flow.add_argument("--silence-warning", type=float, default=60.0, metavar="SECONDS",
                      help="warn when no server has answered for this long while requests "
                      "wait (e.g. a frozen server), and again each time as long; 0: never")


def _classifier_options(p: argparse.ArgumentParser) -> None:
    clf = p.add_argument_group("classifier")
    clf.add_argument("--classifier", type=Path, default=None,
                     help="VirNucPro MLP weights (.safetensors or .npz; .pt/.pth state dict "
                     "needs torch): writes prediction_results.txt and "
                     "prediction_results_highestscore.csv")
    clf.add_argument("--allow-pickle", action="store_true",
                     help="allow a whole pickled module (the original 300_model.pth / "
                     "500_model.pth); runs code from the file, needs torch")


def _display_options(p: argparse.ArgumentParser) -> None:
    ui = p.add_argument_group("display")
    ui.add_argument("--progress", choices=("auto", "rich", "plain"), default="auto",
                    help="auto: a live view when stdout is a terminal, log lines otherwise")
    ui.add_argument("--log-interval", type=_positive_float, default=10.0,
                    help="seconds between progress log lines (plain mode)")
    ui.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ui.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def options_from_args(args: argparse.Namespace) -> RunOptions:
    servers = args.servers or ["localhost:8001"]
    metrics = args.metrics_urls or []
    if len(metrics) > len(servers):
        raise ValueError(f"{len(metrics)} --metrics-url given for {len(servers)} --server")
    specs = tuple(ServerSpec.parse(url, metrics[i] if i < len(metrics) else None)
                  for i, url in enumerate(servers))
    rerun.settle(args)  # --resume: the options not given are the first run's (run.json)
    models = args.models if isinstance(args.models, tuple) else _models(args.models)
    asked = plain.options_from_args(args)  # the input (--sample/--proteins/--dna), --include...
    window, budget = plain.schedule_defaults(args, asked["include"])
    return RunOptions(
        servers=specs, out=args.out, chunk=args.chunk, models=models, **asked,
        skip_bad_records=args.skip_bad_records,
        schedule=ScheduleConfig(window=window, token_budget=budget),
        transport=TransportConfig(max_in_flight=args.max_in_flight, retries=args.retries,
                                  timeout=args.timeout, **_security(args)),
        resume=args.resume, merged=args.merged, classifier=args.classifier,
        allow_pickle=args.allow_pickle,
        tty=None if args.progress == "auto" else args.progress == "rich",
        log_interval=args.log_interval,
        silence_warning=getattr(args, "silence_warning", 60.0),
        resolve_every=getattr(args, "resolve_every", 30.0),
    )


def _security(args: argparse.Namespace) -> dict:
    """TransportConfig's TLS and API key fields (ValueError: a usage error)."""
    ca_file = getattr(args, "tls_ca_file", None)
    cert, key = getattr(args, "tls_cert_file", None), getattr(args, "tls_key_file", None)
    check_ca_file(ca_file)
    check_client_certificate(cert, key)
    return dict(tls=bool(getattr(args, "tls", False) or ca_file or cert), tls_ca_file=ca_file,
                tls_cert_file=cert, tls_key_file=key,
                api_key=read_api_key(getattr(args, "api_key_file", None)))


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted, not when the handler was made
    (run() may be called several times in one process, e.g. by tests that capture stderr)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logger = logging.getLogger("embed_client")
    logger.setLevel(level)
    if not any(getattr(h, "_embed_client", False) for h in logger.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("embed-client: %(message)s"))
        handler._embed_client = True
        logger.addHandler(handler)
    logger.propagate = False


def run(args: argparse.Namespace) -> int:
    """Run with parsed arguments; returns the exit code (callable from tests)."""
    _setup_logging(args)
    try:
        options = options_from_args(args)
    except ValueError as e:
        return _error(str(e), EXIT_USAGE)
    try:
        result = execute(options)
    except InputError as e:
        return _error(f"bad input: {e}", EXIT_INPUT)
    except (OutputError, ClassifierError, OptionError) as e:
        return _error(str(e), EXIT_USAGE)
    except ServerError as e:
        hint = (f"\nthe output directory {options.out} can be resumed with --resume"
                if (options.out / RUN_FILE).is_file() else "")
        return _error(f"{e}{hint}", EXIT_SERVER)
    except IncompleteError as e:
        return _error(f"incomplete: {e}", EXIT_INCOMPLETE)
    except OutputWriteError as e:
        return _error(str(e), EXIT_OUTPUT)
    except (InterruptedRun, KeyboardInterrupt) as e:
        return _error(str(e) or "interrupted", EXIT_INTERRUPTED)
    except ClientError as e:
        return _error(str(e), EXIT_FAILURE)
    if result.message:
        print(f"embed-client: {result.message}", flush=True)
        return EXIT_OK
    s = result.summary
    sent = s.get("stages", {}).get("send", {})
    counts = ", ".join(f"{m} {v['sequences_in']:,}" for m, v in sent.items())
    what = "sequences" if options.plain else "frames"
    print(f"embed-client: complete: {counts} {what} embedded in {s.get('elapsed_s', 0):.1f} s "
          f"-> {result.out}", flush=True)
    return EXIT_OK


def _error(message: str, code: int) -> int:
    print(f"embed-client: error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    sys.exit(run(args))


if __name__ == "__main__":
    main()
