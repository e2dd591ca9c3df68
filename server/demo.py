"""The README's demo, end to end on this machine: demo checkpoints -> a real Triton server ->
embed-client on the bundled sample -> embeddings (and VirNucPro-format predictions).

    python -m embed_server.demo [--workdir demo] [--keep-serving]

Each step is one of the project's commands, printed before it runs, so the demo doubles as
a walk-through of how to use them.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

from .launcher import LaunchError, free_ports, start_server

SAMPLE = Path(__file__).resolve().parents[1] / "client" / "data" / "demo.fasta"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m embed_server.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("demo"), help="where the demo writes everything")
    p.add_argument("--sample", type=Path, default=SAMPLE, help="FASTA/FASTQ to embed")
    p.add_argument("--keep-serving", action="store_true",
                   help="leave the server running after the client finishes (Ctrl-C stops it)")
    return p


def step(title: str, argv: list) -> None:
    print(f"\n== {title}\n$ {' '.join(shlex.quote(str(a)) for a in argv)}", flush=True)


def write_demo_classifier(path: Path, width: int) -> Path:
    """A random VirNucPro-shaped MLP (width -> 512 -> 2) as a state dict, so the demo also shows the
    prediction files. Its scores mean nothing: real runs pass the published 300_model.pth."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    f32 = np.float32
    save_file({
        "hidden_layer.weight": (rng.standard_normal((512, width)) / np.sqrt(width)).astype(f32),
        "hidden_layer.bias": np.zeros(512, f32),
        "bn1.weight": np.ones(512, f32), "bn1.bias": np.zeros(512, f32),
        "bn1.running_mean": np.zeros(512, f32), "bn1.running_var": np.ones(512, f32),
        "output_layer.weight": (rng.standard_normal((2, 512)) / np.sqrt(512)).astype(f32),
        "output_layer.bias": np.zeros(2, f32),
    }, str(path))
    return path


def run(args: argparse.Namespace) -> int:
    from embed_client import cli as client_cli
    from embed_export.cli import main as export_main

    work = args.workdir.resolve()
    repo, out = work / "model_repository", work / "output"
    work.mkdir(parents=True, exist_ok=True)
    if not repo.is_dir():
        step("1. small random checkpoints in the published layouts -> a model repository",
             ["embed-export", "demo", "--out", repo])
        if export_main(["demo", "--out", str(repo)]) != 0:
            return 1
    else:
        print(f"\n== 1. reusing the demo model repository {repo}")

    http, grpc, metrics = free_ports(3)
    step("2. a real Triton server (CPU instances here; one per GPU on a GPU host)",
         ["embed-server", "--model-repository", repo, "--http-port", http, "--grpc-port", grpc,
          "--metrics-port", metrics])
    try:
        with start_server(repo, http_port=http, grpc_port=grpc, metrics_port=metrics) as server:
            print(server.endpoints(), flush=True)
            classifier = write_demo_classifier(work / "demo_classifier.safetensors", _merged_width(repo))
            argv = ["--sample", str(args.sample), "--server", server.grpc_url, "--out", str(out),
                    "--merged", "--classifier", str(classifier)]
            if out.exists():  # a demo starts over; real runs continue with --resume
                shutil.rmtree(out)
            step("3. the sample -> VirNucPro chunks and frames -> both models over gRPC -> Parquet",
                 ["embed-client", *argv])
            code = client_cli.run(client_cli.build_parser().parse_args(argv))
            if code != 0:
                return code
            show(out)
            if args.keep_serving:
                print("\nserving until Ctrl-C ...", flush=True)
                try:
                    server.wait()
                except KeyboardInterrupt:
                    pass
    except LaunchError as err:
        print(f"embed-server: {err}", file=sys.stderr)
        return 1
    return 0


def _merged_width(repo: Path) -> int:
    """DNABERT-S width + ESM-2 width, read from the repository's configs (written by embed-export)."""
    from .repository import output_dims

    return sum(output_dims((repo / model / "config.pbtxt").read_text(), "EMBEDDING")
               for model in ("dnabert_s", "esm2"))


def show(out: Path) -> None:
    import pyarrow.parquet as pq

    summary = json.loads((out / "summary.json").read_text())
    print(f"\n== 4. results in {out}")
    for path in sorted(out.iterdir()):
        if path.is_file():
            print(f"  {path.name:40s} {path.stat().st_size:>10,d} bytes")
    for model in ("dnabert_s", "esm2"):
        table = pq.read_table(out / f"{model}.parquet")
        width = table.schema.field("embedding").type.list_size
        print(f"  {model}: {table.num_rows} embeddings of {width} floats, e.g. {table['id'][0].as_py()}")
    read, prep, send = (summary["stages"][k] for k in ("read", "prep", "send"))
    print(f"  {read['records_kept']} records -> {prep['chunks']} chunks -> {prep['frames']} open frames; "
          + "; ".join(f"{m} {c['sequences_in']} in, {c['sequences_received']} out" for m, c in send.items())
          + f"; {summary['elapsed_s']:.1f} s (summary.json has every count)")


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
