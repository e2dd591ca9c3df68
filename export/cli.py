"""embed-export: a servable model repository from checkpoints, demo checkpoints, or ONNX.

    embed-export --esm2 SRC --dnabert-s SRC --out REPO [--link] [--force]
    embed-export demo --out REPO
    embed-export onnx --model esm2 --checkpoint SRC --out DIR
    embed-export check-fp8 --model esm2 --checkpoint SRC [--fasta FILE] [--plan all|fp8|fp8-smooth|fp8-ffn]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from .checkpoints import (ExportError, ValidCheckpoint, check_fp8, check_out_dir, plans_for, resolve_source,
                          validate_checkpoint)

SOURCE_HELP = ("a local Hugging Face folder{pt}, or a hub id (org/name) downloaded with huggingface_hub "
               "when online")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embed-export",
        description="Build a Triton model repository (esm2, dnabert_s) from checkpoints, validating each "
        "checkpoint completely before anything is written. Subcommands: demo (small random "
        "checkpoints), onnx (encoder + mean pooling to ONNX).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--esm2", metavar="SRC",
                        help="ESM-2 checkpoint: " + SOURCE_HELP.format(pt=" or a fair-esm .pt"))
    parser.add_argument("--dnabert-s", metavar="SRC", help="DNABERT-S checkpoint: " + SOURCE_HELP.format(pt=""))
    parser.add_argument("--out", type=Path, help="model repository folder to write")
    _add_repo_options(parser)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="huggingface_hub cache for hub ids (default: its own, ~/.cache/huggingface)")
    sub = parser.add_subparsers(dest="command", metavar="{demo,onnx,check-fp8}")

    demo = sub.add_parser("demo", help="write small random checkpoints in the published layouts and "
                          "assemble a repository from them", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--out", type=Path, required=True, help="model repository folder to write")
    demo.add_argument("--esm2-format", choices=("hf", "fair-esm"), default="hf",
                      help="serve the ESM-2 demo checkpoint as a HF folder or as a fair-esm .pt")
    demo.add_argument("--force", action="store_true", help="replace --out if it exists")

    onnx = sub.add_parser("onnx", help="export one encoder + mean pooling to ONNX and verify it with "
                          "onnxruntime against the model core", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    onnx.add_argument("--model", choices=("esm2", "dnabert_s"), required=True, help="model kind")
    onnx.add_argument("--checkpoint", required=True, metavar="SRC",
                      help="checkpoint: " + SOURCE_HELP.format(pt=" (or a fair-esm .pt for esm2)"))
    onnx.add_argument("--out", type=Path, required=True, help="folder for model.onnx (+ model.onnx.data)")
    onnx.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    onnx.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                      help="weights in model.onnx.data: auto = when the model exceeds protobuf's 2 GB")
    onnx.add_argument("--tolerance", type=float, default=1e-4,
                      help="largest accepted |onnxruntime - model core| on the verification sequences")
    onnx.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    onnx.add_argument("--force", action="store_true", help="replace --out if it exists")
    onnx.add_argument("--cache-dir", type=Path, default=None, help="huggingface_hub cache for hub ids")
    _add_check_fp8(sub)
    return parser


def _add_check_fp8(sub) -> None:
    from embed_core.fp8 import DEFAULT_MIN_COSINE
    check = sub.add_parser("check-fp8", help="the fp8 plans' accuracy gate on a checkpoint: pooled embeddings "
                           "with each fp8 plan against fp32, refused below --min-cosine (exit 1)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    check.add_argument("--model", choices=("esm2", "dnabert_s"), required=True, help="model kind")
    check.add_argument("--checkpoint", required=True, metavar="SRC",
                       help="checkpoint: " + SOURCE_HELP.format(pt=" (or a fair-esm .pt for esm2)"))
    check.add_argument("--fasta", type=Path, default=None,
                       help="your own sequences (default: 160 bundled synthetic ones, embed_core.fp8_gate)")
    check.add_argument("--max-sequences", type=int, default=1000, help="use at most this many from --fasta")
    check.add_argument("--plan", choices=("all", "fp8", "fp8-smooth", "fp8-ffn"), default="all",
                       help="fp8 = every linear in e4m3; fp8-smooth = the same with the LayerNorms' outlier "
                       "channels moved into the weights (ESM-2: pre-LN); fp8-ffn = the feed-forward's only; "
                       "all = each that the model can run, fastest first")
    check.add_argument("--min-cosine", type=float, default=DEFAULT_MIN_COSINE,
                       help="the smallest per-sequence cosine accepted (the model config's fp8_min_cosine)")
    check.add_argument("--device", default="auto", help="auto | cuda | cuda:N (fp8 needs compute capability >= 8.9)")
    check.add_argument("--cache-dir", type=Path, default=None, help="huggingface_hub cache for hub ids")


def _add_repo_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--link", action="store_true",
                        help="symlink the checkpoints into the repository instead of copying them "
                        "(the link must resolve wherever the repository is served, e.g. in a container)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    """Execute the parsed command (main() has refused the usage errors: no source, no --out); 0 on
    success, 1 (message on stderr) on failure."""
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "onnx":
            return _onnx(args)
        if args.command == "check-fp8":
            return _check_fp8(args)
        return _build(args)
    except ExportError as err:
        print(f"embed-export: error: {err}", file=sys.stderr, flush=True)
        return 1


def _build(args: argparse.Namespace) -> int:
    sources = {kind: src for kind, src in (("esm2", args.esm2), ("dnabert_s", args.dnabert_s)) if src}
    check_out_dir(args.out, args.force)
    valid = {}
    for kind, source in sources.items():
        path = resolve_source(source, args.cache_dir)
        print(f"embed-export: validating {kind} checkpoint {path}", flush=True)
        valid[kind] = validate_checkpoint(kind, path)
        _report(valid[kind])
    write_repository(args.out, valid, link=args.link, force=args.force)
    print(f"embed-export: wrote {args.out} ({', '.join(valid)})", flush=True)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from embed_core.demo import write_demo_checkpoints

    check_out_dir(args.out, args.force)
    with tempfile.TemporaryDirectory(prefix="embed-export-demo-") as tmp:
        write_demo_checkpoints(Path(tmp))
        esm2 = Path(tmp) / ("esm2" if args.esm2_format == "hf" else "esm2_fair.pt")
        valid = {kind: validate_checkpoint(kind, path) for kind, path in
                 (("esm2", esm2), ("dnabert_s", Path(tmp) / "dnabert_s"))}
        for checkpoint in valid.values():
            _report(checkpoint)
        write_repository(args.out, valid, link=False, force=args.force)
    print(f"embed-export: wrote demo repository {args.out} (random weights: for tests and demos only)", flush=True)
    return 0


def _onnx(args: argparse.Namespace) -> int:
    from .onnx_export import export_onnx

    path = resolve_source(args.checkpoint, args.cache_dir)
    print(f"embed-export: exporting {args.model} from {path} to ONNX (opset {args.opset})", flush=True)
    result = export_onnx(args.model, path, args.out, opset=args.opset, external_data=args.external_data,
                         verify=not args.no_verify, tolerance=args.tolerance, overwrite=args.force)
    layout = "with external data model.onnx.data" if result.external_data else "single file"
    print(f"embed-export: wrote {result.path} ({layout}, {result.bytes / 2**20:.1f} MiB, "
          f"embedding [batch, {result.hidden_size}])", flush=True)
    if result.max_abs_diff is None:
        print("embed-export: not verified (--no-verify)", flush=True)
    else:
        print(f"embed-export: verified with onnxruntime (CPU) on {result.sequences} mixed-length sequences, "
              f"padded together and alone: max |onnx - model core| = {result.max_abs_diff:.3g} "
              f"(tolerance {args.tolerance:g})", flush=True)
    return 0


def _check_fp8(args: argparse.Namespace) -> int:
    """Each asked fp8 plan measured on the checkpoint; 0 when the asked plan (or, with all, at least
    one) passes, 1 otherwise. The figures are printed either way."""
    from embed_core.fp8_gate import read_fasta

    path = resolve_source(args.checkpoint, args.cache_dir)
    plans = plans_for(args.model) if args.plan == "all" else (args.plan,)
    sequences = read_fasta(args.fasta, args.max_sequences) if args.fasta else None
    source = f"{len(sequences)} sequences of {args.fasta}" if sequences else "the bundled sequences"
    print(f"embed-export: check-fp8 {args.model} {path} on {source}", flush=True)
    try:
        checks = check_fp8(args.model, path, plans, sequences, args.min_cosine, args.device)
    except ValueError as err:   # e.g. no FP8 on this device
        raise ExportError(str(err)) from None
    for check in checks:
        print(f"embed-export: {check.describe()}", flush=True)
    passed = [c.plan for c in checks if c.passed]
    print(f"embed-export: dtype {passed[0] if passed else 'bfloat16'} is the fastest plan this checkpoint "
          f"passes (model config parameter dtype)", flush=True)
    return 0 if passed else 1


def _report(checkpoint: ValidCheckpoint) -> None:
    print(f"embed-export: {checkpoint.kind}: OK, hidden size {checkpoint.hidden_size}, "
          f"{checkpoint.parameters / 1e6:.1f}M parameters", flush=True)


def write_repository(out: Path, valid: dict, link: bool = False, force: bool = False) -> Path:
    """Assemble `out` from validated checkpoints: built beside it, then moved in place whole."""
    from embed_server.repository import assemble_repository

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        assemble_repository(staging / "repo", {k: c.path for k, c in valid.items()},
                            embedding_dims={k: c.hidden_size for k, c in valid.items()}, symlink=link)
        if out.exists():
            check_out_dir(out, force)
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        (staging / "repo").rename(out)
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot write {out}: {type(err).__name__}: {err}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None and not (args.esm2 or args.dnabert_s):   # a usage error: exit 2, as argparse's own
        parser.error("nothing to export: give --esm2 and/or --dnabert-s with --out (or a subcommand: demo, onnx, "
                     "check-fp8)")
    if args.command is None and args.out is None:
        parser.error("--out is required")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
