"""embed-server: run tritonserver on a model repository, without Docker."""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

from .launcher import LaunchError, ServerOptions, TritonServer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="embed-server",
        description="Start tritonserver on a model repository (esm2, dnabert_s), wait until every "
        "model is ready, print the endpoints, and run until interrupted. On a host without GPU "
        "(or with --cpu) each model's configs/cpu.pbtxt is used.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model-repository", type=Path, required=True, help="model repository folder")
    p.add_argument(
        "--address", default="127.0.0.1",
        help="address the three endpoints listen on (0.0.0.0: every interface)",
    )
    p.add_argument("--http-port", type=int, default=8000, help="HTTP/REST (KServe v2) port")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC (KServe v2) port")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus /metrics port")
    p.add_argument(
        "--cpu", action="store_true", default=None,
        help="use the CPU configs (--model-config-name=cpu) even when a GPU is visible; "
        "without it they are used only when no GPU is visible",
    )
    p.add_argument(
        "--tritonserver", type=Path, default=None,
        help="tritonserver binary (default: $TRITONSERVER, PATH, then the nvidia-pytriton package)",
    )
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    p.add_argument(
        "--log-file", type=Path, default=None,
        help="keep tritonserver's log in this file (default: a temporary file removed at exit)",
    )
    p.add_argument(
        "--shm-byte-size", type=int, default=16 * 1024 * 1024,
        help="Python backend shared memory per model instance (initial size and growth step)",
    )
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for every model")
    return p


def run(args: argparse.Namespace) -> int:
    """Start, wait until ready, serve until the child exits; returns the exit code."""
    try:
        server = TritonServer(ServerOptions(
            model_repository=args.model_repository,
            address=args.address,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            cpu=args.cpu,
            tritonserver=args.tritonserver,
            log_verbose=args.log_verbose,
            log_file=args.log_file,
            shm_byte_size=args.shm_byte_size,
            startup_timeout_s=args.startup_timeout,
        ))
        print(f"embed-server: starting tritonserver on {server.options.model_repository}", flush=True)
        server.start()
    except LaunchError as err:
        print(f"embed-server: error: {err}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    previous = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda s, _frame: server.send_signal(s))
        kind = "CPU configs (configs/cpu.pbtxt)" if server.use_cpu_configs else "GPU configs (config.pbtxt)"
        print(f"embed-server: ready: {', '.join(server.models)} with {kind}", flush=True)
        print(server.endpoints(), flush=True)
        print(f"tritonserver log: {server.log_path}", flush=True)
        code = server.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        server.stop()
    if code < 0:  # killed by a signal: report it as a shell does (128 + signal number)
        print(f"embed-server: tritonserver was killed by signal {-code}", flush=True)
        return 128 - code
    print(f"embed-server: tritonserver exited with code {code}", flush=True)
    return code


def main(argv: Optional[Sequence[str]] = None) -> None:
    sys.exit(run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
