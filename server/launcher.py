"""Supervising one tritonserver child process for embed-server: start it behind its front ends (and
the optional gRPC proxy), wait until every model is ready or say why one is not, and stop it
leaving no process, socket or shared-memory region behind."""

# Safety (issue 14): Triton's own HTTP and metrics servers listen only on Unix sockets in the
# launcher's private work directory; the HTTP and metrics ports are served by `frontend.Frontend`,
# which refuses oversized and malformed requests before Triton parses them (tritonserver 2.51 dies
# of a stack overflow on a form-urlencoded body of ~4.2 MB) and can serve HTTPS. The admin APIs are
# restricted, and inference needs the API key when one is set (triton_command.py); gRPC can run
# over TLS (Triton's own, or the proxy's: tls.py). The other parts: server_options.py (ServerOptions,
# LaunchError), triton_binary.py (the binary, backend directory and environment), triton_status.py
# (health over the Unix socket, load failures); the names the CLI and the tests take from here are
# re-exported.

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

from . import frontend, tls
from .server_options import KEY_RULE, LaunchError, ServerOptions
from .triton_binary import (assemble_backends, check_stub_python, find_tritonserver, gpu_visible, server_env,
                            stub_python_version)
from .triton_command import DISABLED_ADMIN_HEADER, triton_command
from .triton_status import failures_from_log, format_failures, http_request, unix_url

__all__ = [
    "CPU_MALLOC_ENV", "KEY_RULE", "LaunchError", "ServerOptions", "TritonServer", "assemble_backends",
    "check_stub_python", "die_with_parent", "failures_from_log", "find_tritonserver", "format_failures",
    "free_ports", "gpu_visible", "http_request", "raise_open_files_limit", "server_env", "start_server",
    "stub_python_version",
]


def _listen(label: str, address: str, port: int, start):
    """start() (a front end's or the gRPC proxy's), its failure to listen a LaunchError naming the port."""
    try:
        return start()
    except OSError as err:
        reason = "already in use" if err.errno == errno.EADDRINUSE else str(err)
        raise LaunchError(f"cannot listen on {label} {address}:{port}: {reason}") from None


try:  # resolved here, not in the forked child, where an import could deadlock
    import ctypes

    _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None
PR_SET_PDEATHSIG = 1

# glibc malloc in tritonserver and its stubs on the CPU configs (where the models' activations are
# host memory): with its defaults (a dynamic mmap threshold, an arena per thread) the ESM-2 stubs grew
# ~40 MB/min each under a mix of request sizes and never gave it back (perf/soak.py, 5 min: +94 MB/min
# for the server, 2026-12-04); with these, +8 MB/min and flat. The operator's own values win.
# GPU configs keep glibc's defaults (not measured there).
CPU_MALLOC_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "262144", "MALLOC_TRIM_THRESHOLD_": "524288"}


def die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the launching thread dies (Linux), so a
    killed launcher or test run leaves no tritonserver behind."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class TritonServer:
    """One tritonserver child process: start, wait until every model is ready, stop."""

    def __init__(self, options: ServerOptions):
        self.options = options
        self.process: Optional[subprocess.Popen] = None
        self.use_cpu_configs = False
        self._workdir: Optional[Path] = None
        self._log_handle = None
        self.log_path: Optional[Path] = None
        self.models: list = []  # names of the models served, once ready
        self.frontend: Optional[frontend.Frontend] = None          # the HTTP port
        self.metrics_frontend: Optional[frontend.Frontend] = None  # the metrics port
        self.grpc_proxy = None  # the gRPC port, with --grpc-max-request-bytes (grpc_proxy.GrpcProxy)
        # Triton's restriction of the admin APIs: the operator's key, or a name no gRPC client
        # can send and a random value (the launcher itself uses it for the repository index).
        if options.admin_key:
            self.admin_header, self._admin_value = frontend.ADMIN_HEADER, options.admin_key
        else:
            self.admin_header, self._admin_value = DISABLED_ADMIN_HEADER, secrets.token_hex(32)
        # Our own prefix for the Python backend's /dev/shm regions, so that stop() can
        # remove any that a killed server or stub leaves behind, and only ours.
        self.shm_prefix = f"embed_server_{os.getpid()}_{uuid.uuid4().hex[:8]}_"

    @property
    def http_url(self) -> str:
        scheme = "https" if self.options.tls else "http"
        return f"{scheme}://{self.options.host}:{self.options.http_port}"

    @property
    def http_socket(self) -> Optional[str]:
        """tritonserver's own HTTP server: a Unix socket in the private work directory."""
        return str(self._workdir / "triton-http.sock") if self._workdir is not None else None

    @property
    def metrics_socket(self) -> Optional[str]:
        """tritonserver's metrics server (evhtp too, with the same crash): a Unix socket as well."""
        return str(self._workdir / "triton-metrics.sock") if self._workdir is not None else None

    @property
    def grpc_socket(self) -> Optional[str]:
        """With the gRPC proxy: tritonserver's gRPC server, on a Unix socket (tritonserver adds
        ':<port>' to the address it is given, so that is the file's name)."""
        return str(self._workdir / "triton-grpc.sock") if self._workdir is not None else None

    @property
    def triton_url(self) -> str:
        """tritonserver's own HTTP server, for http_request (the launcher's health checks)."""
        return unix_url(self.http_socket or "")

    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.options.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.options.host}:{self.options.metrics_port}/metrics"

    def command(self, binary: Path, backend_dir: Path) -> list:
        """tritonserver's command line (triton_command.py) for this server's sockets and keys."""
        return triton_command(
            self.options, binary, backend_dir, http_socket=self.http_socket, grpc_socket=self.grpc_socket,
            metrics_socket=self.metrics_socket, admin_header=self.admin_header, admin_value=self._admin_value,
            shm_prefix=self.shm_prefix, use_cpu_configs=self.use_cpu_configs,
        )

    def start_frontend(self) -> None:
        o = self.options
        raise_open_files_limit()
        self.frontend = frontend.Frontend(frontend.FrontendOptions(
            host=o.address, port=o.http_port, backend_socket=self.http_socket,
            max_body_bytes=o.max_request_bytes, ssl_context=tls.ssl_context(o),
            admin_key=o.admin_key, api_key=o.api_key,
            backend_admin_header=self.admin_header, backend_admin_key=self._admin_value,
        ))
        self.metrics_frontend = frontend.Frontend(frontend.FrontendOptions(
            host=o.address, port=o.metrics_port, backend_socket=self.metrics_socket,
            max_body_bytes=0, metrics_only=True,
        ))
        for label, port, front in (("HTTP", o.http_port, self.frontend), ("metrics", o.metrics_port,
                                                                          self.metrics_frontend)):
            _listen(label, o.address, port, front.start)

    def start_grpc_proxy(self) -> None:
        """With --grpc-max-request-bytes; started after tritonserver is forked (gRPC's threads
        and fork() do not mix)."""
        o = self.options
        try:
            from .grpc_proxy import GrpcProxy
        except ImportError as err:
            raise LaunchError(f"--grpc-max-request-bytes needs grpcio ({err}): pip install grpcio") from None
        proxy = GrpcProxy(o.address, o.grpc_port, f"unix:{self.grpc_socket}:{o.grpc_port}",
                          o.grpc_max_request_bytes, tls.grpc_credentials(o))
        self.grpc_proxy = _listen("gRPC", o.address, o.grpc_port, proxy.start)

    def start(self) -> "TritonServer":
        """Start tritonserver and return once every model is ready; LaunchError otherwise."""
        o = self.options
        binary = find_tritonserver(o.tritonserver)
        env = server_env(binary)
        check_stub_python(env)
        self.use_cpu_configs = o.cpu if o.cpu is not None else not gpu_visible()
        if self.use_cpu_configs:
            env = {**CPU_MALLOC_ENV, **env}
        self._workdir = Path(tempfile.mkdtemp(prefix="embed-server-"))
        try:  # from here on, a failure removes the work directory and stops the child
            try:
                backend_dir = assemble_backends(binary, self._workdir / "backends")
                self.start_frontend()
                self.log_path = Path(o.log_file) if o.log_file else self._workdir / "tritonserver.log"
                self._log_handle = open(self.log_path, "ab")
                self.process = subprocess.Popen(
                    self.command(binary, backend_dir),
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=self._log_handle,
                    stderr=subprocess.STDOUT,
                    # Own process group: a terminal's Ctrl-C reaches us, and we forward it.
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                )
            except OSError as err:  # a log file in a missing folder, a binary that cannot run
                raise LaunchError(f"cannot start {binary}: {err}") from err
            if o.grpc_max_request_bytes:
                self.start_grpc_proxy()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def repository_index(self) -> Optional[list]:
        """The models and their states; None when the server did not answer with a list."""
        status, index = http_request(f"{self.triton_url}/v2/repository/index", data=b"{}")
        return index if status == 200 and isinstance(index, list) else None

    def wait_ready(self) -> None:
        """Poll until all models are READY; raise naming each model that failed.

        In the default model-control mode tritonserver loads every model before it opens
        its endpoints, so once HTTP answers, each model's load has finished one way or
        the other and the repository index carries its state and reason.
        """
        deadline = time.monotonic() + self.options.startup_timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                failures = failures_from_log(self.log_text())
                if failures:
                    raise LaunchError(format_failures(failures))
                tail = "\n".join(self.log_text().splitlines()[-20:])
                raise LaunchError(f"tritonserver exited with code {code} before it was ready:\n{tail}")
            status, _ = http_request(f"{self.triton_url}/v2/health/live", timeout=2)
            if status == 200:
                index = self.repository_index()
                if index is None:  # not answered (yet): ask again
                    time.sleep(0.25)
                    continue
                if not index:
                    raise LaunchError(f"no models found in {self.options.model_repository}")
                failed = {m["name"]: m.get("reason", "") for m in index if m.get("state") == "UNAVAILABLE"}
                if failed:
                    from_log = failures_from_log(self.log_text())
                    raise LaunchError(
                        format_failures({n: r or from_log.get(n, "") for n, r in failed.items()})
                    )
                ready, _ = http_request(f"{self.triton_url}/v2/health/ready", timeout=2)
                if ready == 200 and all(m.get("state") == "READY" for m in index):
                    self.models = [m["name"] for m in index]
                    return
            time.sleep(0.25)
        raise LaunchError(f"tritonserver was not ready after {self.options.startup_timeout_s:.0f} s (log: {self.log_path})")

    def send_signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self) -> int:
        return self.process.wait()

    def stop(self, timeout_s: float = 30.0) -> Optional[int]:
        """SIGTERM (graceful: in-flight requests finish), then SIGKILL the whole group."""
        code = None
        for front in (self.frontend, self.metrics_frontend, self.grpc_proxy):
            if front is not None:
                front.stop()
        self.frontend = self.metrics_frontend = self.grpc_proxy = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)  # stubs left behind, if any
            code = self.process.wait()
        for region in Path("/dev/shm").glob(self.shm_prefix + "*"):
            with contextlib.suppress(OSError):
                region.unlink()
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)  # with the log, unless log_file
            self._workdir = None
        return code

    def endpoints(self) -> str:
        o = self.options
        grpc = f"{self.grpc_url} (TLS{', client certificates' if o.tls_client_ca else ''})" if o.tls else self.grpc_url
        if o.grpc_max_request_bytes:
            grpc += f" (messages up to {o.grpc_max_request_bytes:,} bytes)"
        return (
            f"HTTP     {self.http_url} (bodies up to {o.max_request_bytes:,} bytes)\n"
            f"gRPC     {grpc}\n"
            f"metrics  {self.metrics_url}\n"
            f"admin APIs {'need the ' + frontend.ADMIN_HEADER + ' header' if o.admin_key else 'disabled'}; "
            f"inference {'needs the ' + frontend.API_KEY_HEADER + ' header' if o.api_key else 'open'}"
        )


def raise_open_files_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: the front ends hold two descriptors per client
    connection (client and tritonserver sides), and 1,024 is a common default."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            wanted = 65536 if hard == resource.RLIM_INFINITY else hard
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    except (ImportError, ValueError, OSError):
        pass


@contextlib.contextmanager
def start_server(model_repository, **options) -> Iterator[TritonServer]:
    """`with start_server(repo, http_port=..., cpu=True) as server:` a ready server, stopped after.

    The server also stops if the thread that started it dies (PR_SET_PDEATHSIG): start it
    from a thread that outlives its use, e.g. the main thread.
    """
    server = TritonServer(ServerOptions(model_repository=Path(model_repository), **options))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def free_ports(n: int = 3) -> list:
    """`n` distinct TCP ports that were free a moment ago (for tests and demos)."""
    import socket

    sockets, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports
