"""embed-server: run tritonserver on a model repository, without Docker."""
from __future__ import annotations

import argparse
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Optional, Sequence

from .frontend import ADMIN_HEADER, API_KEY_HEADER, GRPC_HEADER_PREFIX
from .launcher import KEY_RULE, LaunchError, ServerOptions, TritonServer

SECURITY_HELP = f"""
safety:
  HTTP is served by embed-server's front end, which refuses request bodies over
  --max-request-bytes (413) and malformed requests before tritonserver parses them;
  tritonserver's own HTTP server listens only on a private Unix socket. gRPC messages are
  limited by tritonserver to 2 GiB (--grpc-max-request-bytes: a lower limit, through a proxy);
  the models refuse over-long or too many sequences.

  Admin APIs (shared memory, model repository, logging, trace) are disabled unless an admin
  key is given; then they need the header {ADMIN_HEADER} (HTTP) or
  {GRPC_HEADER_PREFIX}{ADMIN_HEADER} (gRPC metadata). With an API key, inference needs
  {API_KEY_HEADER} (HTTP) or {GRPC_HEADER_PREFIX}{API_KEY_HEADER} (gRPC). Keys come from a file
  (--admin-key-file, --api-key-file, or $EMBED_ADMIN_KEY_FILE, $EMBED_API_KEY_FILE) or from
  $EMBED_ADMIN_KEY, $EMBED_API_KEY; never from the command line. A key is {KEY_RULE}.
  tritonserver 2.51 takes them only as options, so they appear in its command line: on a
  shared host mount /proc with hidepid=2 (see docs/deploy.md).

  --tls-cert/--tls-key (or $EMBED_TLS_CERT, $EMBED_TLS_KEY) serve gRPC over TLS and HTTPS;
  --tls-client-ca also requires client certificates signed by that CA on both.
"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the safety notes kept as written."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="embed-server",
        description="Start tritonserver on a model repository (esm2, dnabert_s), wait until every "
        "model is ready, print the endpoints, and run until interrupted. On a host without GPU "
        "(or with --cpu) each model's configs/cpu.pbtxt is used.",
        formatter_class=HelpFormatter,
        epilog=SECURITY_HELP,
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
    p.add_argument(
        "--max-request-bytes", type=int, default=32 * 1024 * 1024,
        help="largest HTTP request body; larger ones get 413 before tritonserver sees them "
        "(default 32 MiB: 1,024 x 10 kb DNA sequences as JSON are about 10.3 MB)",
    )
    p.add_argument(
        "--grpc-max-request-bytes", type=int, default=0,
        help="serve gRPC through embed-server's gRPC proxy, refusing messages over this many bytes "
        "(RESOURCE_EXHAUSTED) before they are read; 0: tritonserver's own gRPC server, which takes "
        "messages up to 2 GiB (docs/deploy.md: why and what it costs)",
    )
    p.add_argument("--tls-cert", type=Path, default=env_path("EMBED_TLS_CERT"),
                   help="PEM certificate (chain) for gRPC over TLS and HTTPS [$EMBED_TLS_CERT]")
    p.add_argument("--tls-key", type=Path, default=env_path("EMBED_TLS_KEY"),
                   help="PEM private key of --tls-cert [$EMBED_TLS_KEY]")
    p.add_argument("--tls-client-ca", type=Path, default=env_path("EMBED_TLS_CLIENT_CA"),
                   help="PEM CA certificate: require client certificates it signed (mutual TLS) [$EMBED_TLS_CLIENT_CA]")
    p.add_argument("--admin-key-file", type=Path, default=env_path("EMBED_ADMIN_KEY_FILE"),
                   help="file holding the admin key that opens the admin APIs (or $EMBED_ADMIN_KEY); "
                   "without one they are disabled [$EMBED_ADMIN_KEY_FILE]")
    p.add_argument("--api-key-file", type=Path, default=env_path("EMBED_API_KEY_FILE"),
                   help="file holding the API key that inference then requires (or $EMBED_API_KEY) "
                   "[$EMBED_API_KEY_FILE]")
    p.add_argument("--triton-arg", action="append", default=[], metavar="--OPTION=VALUE",
                   help="a further tritonserver option, e.g. --triton-arg=--model-load-thread-count=8 "
                   "(repeatable; replaces embed-server's default for the same option; the listening, "
                   "TLS and restriction options are embed-server's own)")
    return p


def env_path(name: str) -> Optional[Path]:
    value = os.environ.get(name, "").strip()
    return Path(value) if value else None


def read_key(path: Optional[Path], env_name: str, label: str) -> Optional[str]:
    """A key from its file, else from the environment variable; None when neither is set."""
    if path is not None:
        try:
            info = path.stat()
            text = path.read_text()
        except OSError as err:
            raise LaunchError(f"cannot read the {label} file {path}: {err.strerror}") from None
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            print(f"embed-server: warning: the {label} file {path} is readable by other users "
                  f"(chmod 600 {path})", file=sys.stderr, flush=True)
        key = text.strip()
        if not key:
            raise LaunchError(f"the {label} file {path} is empty")
        return key
    key = os.environ.get(env_name, "").strip()
    return key or None


def run(args: argparse.Namespace) -> int:
    """Start, wait until ready, serve until the child exits; returns the exit code."""
    try:
        admin_key = read_key(args.admin_key_file, "EMBED_ADMIN_KEY", "admin key")
        api_key = read_key(args.api_key_file, "EMBED_API_KEY", "API key")
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
            max_request_bytes=args.max_request_bytes,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            admin_key=admin_key,
            api_key=api_key,
            triton_args=tuple(args.triton_arg),
            grpc_max_request_bytes=args.grpc_max_request_bytes,
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
        if server.options.address not in ("127.0.0.1", "localhost", "::1"):
            missing = [w for w, absent in (("TLS", not server.options.tls), ("an API key", not server.options.api_key))
                       if absent]
            if missing:
                print(f"embed-server: warning: listening on {server.options.address} without "
                      f"{' or '.join(missing)}: whoever reaches these ports can run inference "
                      "(docs/deploy.md, 'Safety')", file=sys.stderr, flush=True)
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
