"""Run a real tritonserver on our model repository without Docker.

The binary comes from `--tritonserver`, `$TRITONSERVER`, PATH, or the `nvidia-pytriton`
wheel. The Python backend needs three things the wheel leaves to us: a backend directory
holding the backend library together with the stub built for the running Python, the
wheel's bundled libraries on LD_LIBRARY_PATH, and this environment's `bin` first on PATH
(the stub finds its packages through the `python3` on PATH, not PYTHONPATH).

Safety (issue 14): Triton's own HTTP and metrics servers listen only on Unix sockets in the
launcher's private work directory; the HTTP and metrics ports are served by `frontend.Frontend`, which refuses
oversized and malformed requests before Triton parses them (tritonserver 2.51 dies of a stack
overflow on a form-urlencoded body of ~4.2 MB) and can serve HTTPS. The admin APIs
(shared memory, model repository, logging, trace) are restricted on HTTP and gRPC with the
operator's admin key, or with a header name no gRPC client can send when there is none;
inference needs the API key when one is set. gRPC can run over TLS (Triton's own).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import socket
import signal
import subprocess
import sys
import tempfile
import time
import http.client
import ssl
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator, Optional

from . import frontend


class LaunchError(Exception):
    """The server could not be started, or a model in the repository did not load."""


KEY_PATTERN = re.compile(r"^[A-Za-z0-9._~+/-]{16,256}$")
KEY_RULE = "16 to 256 characters from A-Z a-z 0-9 . _ ~ + / - (e.g. `openssl rand -hex 32`)"
# The name Triton's admin restriction uses when no admin key is configured: upper-case letters
# are illegal in gRPC metadata keys, so no gRPC client can ever send it (and the HTTP side is
# closed by the front end); the value is random besides.
DISABLED_ADMIN_HEADER = "X-Admin-Disabled"
# tritonserver options that embed-server owns: --triton-arg may not change them.
OWNED_TRITON_OPTIONS = (
    "--http", "--grpc", "--allow-http", "--allow-grpc", "--allow-sagemaker", "--sagemaker",
    "--allow-vertex-ai", "--vertex-ai", "--metrics-address", "--metrics-port", "--model-repository",
    "--backend-directory", "--model-control-mode", "--load-model", "--model-config-name",
)


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """How to run tritonserver; `cpu=None` means: CPU configs when no GPU is visible."""

    model_repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    cpu: Optional[bool] = None
    tritonserver: Optional[Path] = None
    log_verbose: int = 0
    log_file: Optional[Path] = None
    shm_byte_size: int = 16 * 1024 * 1024
    startup_timeout_s: float = 600.0
    address: str = "127.0.0.1"  # where tritonserver listens; 0.0.0.0 for every interface
    max_request_bytes: int = 32 * 1024 * 1024  # largest HTTP request body (the front end's 413)
    tls_cert: Optional[Path] = None        # PEM certificate (chain): gRPC over TLS and HTTPS
    tls_key: Optional[Path] = None         # its PEM private key
    tls_client_ca: Optional[Path] = None   # PEM CA: clients must present a certificate it signed
    admin_key: Optional[str] = dataclasses.field(default=None, repr=False)  # opens the admin APIs
    api_key: Optional[str] = dataclasses.field(default=None, repr=False)    # required for inference
    triton_args: tuple = ()                # further tritonserver options (not the owned ones)
    grpc_max_request_bytes: int = 0        # > 0: gRPC through grpc_proxy with this message limit

    def __post_init__(self):
        object.__setattr__(self, "model_repository", Path(self.model_repository).resolve())
        if not self.model_repository.is_dir():
            raise LaunchError(f"model repository {self.model_repository} is not a directory")
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if len(set(ports)) != 3:
            raise LaunchError(f"HTTP, gRPC and metrics ports must differ, got {ports}")
        if self.grpc_max_request_bytes and self.grpc_max_request_bytes < 1024:
            raise LaunchError(f"the gRPC message limit must be at least 1024 bytes, got {self.grpc_max_request_bytes}")
        if self.max_request_bytes < 1024:
            raise LaunchError(f"the request size limit must be at least 1024 bytes, got {self.max_request_bytes}")
        for label, key in (("admin key", self.admin_key), ("API key", self.api_key)):
            if key is not None and not KEY_PATTERN.match(key):
                raise LaunchError(f"the {label} must be {KEY_RULE}")  # the key itself is never shown
        if self.admin_key and self.api_key and self.admin_key == self.api_key:
            raise LaunchError("the admin key and the API key must differ")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise LaunchError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise LaunchError("--tls-client-ca needs --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            value = getattr(self, name)
            if value is not None:
                value = Path(value).resolve()
                if not value.is_file():
                    raise LaunchError(f"{name.replace('_', '-')} {value} is not a file")
                object.__setattr__(self, name, value)
        object.__setattr__(self, "triton_args", tuple(self.triton_args))
        for arg in self.triton_args:
            if not arg.startswith("--"):
                raise LaunchError(f"a tritonserver option starts with --, got {arg!r}")
            if arg.split("=", 1)[0].startswith(OWNED_TRITON_OPTIONS):
                raise LaunchError(f"{arg.split('=', 1)[0]} is set by embed-server itself (see embed-server --help)")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def host(self) -> str:
        """Where a client on this machine reaches the server."""
        return "127.0.0.1" if self.address in ("0.0.0.0", "::", "") else self.address


# ---------------------------------------------------------------- finding the parts


def pytriton_dist() -> Optional[Path]:
    """`pytriton/tritonserver` of the installed nvidia-pytriton wheel, or None."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    dist = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return dist if (dist / "bin" / "tritonserver").exists() else None


def find_tritonserver(explicit: Optional[Path] = None) -> Path:
    """The tritonserver binary: the argument, $TRITONSERVER, PATH, then nvidia-pytriton."""
    tried = []
    for label, candidate in (
        ("--tritonserver", explicit),
        ("$TRITONSERVER", os.environ.get("TRITONSERVER")),
    ):
        if candidate:
            path = Path(candidate)
            if path.is_file() and os.access(path, os.X_OK):
                return path.resolve()
            raise LaunchError(f"{label} {path} is not an executable file")
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path).resolve()
    tried.append("PATH")
    dist = pytriton_dist()
    if dist is not None:
        return dist / "bin" / "tritonserver"
    tried.append("the nvidia-pytriton package")
    raise LaunchError(
        "tritonserver not found (looked at --tritonserver, $TRITONSERVER, "
        + ", ".join(tried)
        + "); install it with `pip install 'virnuc-embed[server]'` (nvidia-pytriton==0.7.0)"
    )


def stub_python_version() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def assemble_backends(binary: Path, out_dir: Path) -> Path:
    """A backend directory whose `python/` holds the backend and a stub for this Python.

    A tritonserver install (e.g. /opt/tritonserver in the NGC image) already has
    `backends/python/triton_python_backend_stub`: use it as it is. The nvidia-pytriton
    wheel keeps one stub per Python under `python_backend_stubs/<X.Y>/`: copy the backend
    files and the matching stub into `out_dir/python`.
    """
    root = binary.parent.parent
    backend = root / "backends" / "python"
    if not (backend / "libtriton_python.so").exists():
        raise LaunchError(f"no Python backend at {backend} (beside {binary})")
    if (backend / "triton_python_backend_stub").exists():
        return backend.parent
    version = stub_python_version()
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        have = sorted(p.name for p in (root / "python_backend_stubs").glob("*"))
        raise LaunchError(
            f"no Python backend stub for Python {version} under {root / 'python_backend_stubs'} "
            f"(have: {', '.join(have) or 'none'}); run embed-server with one of those Pythons"
        )
    target = out_dir / "python"
    target.mkdir(parents=True, exist_ok=True)
    for item in backend.iterdir():
        if item.is_file():
            shutil.copy2(item, target / item.name)
    shutil.copy2(stub, target / stub.name)
    os.chmod(target / stub.name, 0o755)  # wheels extracted by zipfile lose the run bit
    return out_dir


SECRET_ENV = ("EMBED_ADMIN_KEY", "EMBED_API_KEY", "EMBED_ADMIN_KEY_FILE", "EMBED_API_KEY_FILE")


def server_env(binary: Path) -> dict:
    """The child's environment: bundled libraries and this environment's bin first on PATH."""
    env = dict(os.environ)
    libs = [binary.parent.parent.parent.parent / "nvidia_pytriton.libs"]  # beside pytriton/
    libs = [str(p) for p in libs if p.is_dir()]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    if libs:
        env["LD_LIBRARY_PATH"] = ":".join(libs)
    # Not resolved: a venv's bin/python is a symlink to the base interpreter, and the
    # stub must find the venv's python3 (and with it the venv's site-packages).
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    for name in SECRET_ENV:  # the keys stay with embed-server
        env.pop(name, None)
    return env


def gpu_visible() -> bool:
    """True when a CUDA GPU is visible, judged without importing torch."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() in ("", "-1", "none", "NoDevFiles"):
        return False
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
            return out.returncode == 0 and "GPU " in out.stdout
        except (OSError, subprocess.TimeoutExpired):
            pass
    return any(Path("/dev").glob("nvidia[0-9]*"))


def check_stub_python(env: dict) -> None:
    """The stub's `python3` must match the stub's version and have numpy < 2.

    The 2.51 Python backend returns EMPTY output tensors and crashes on TYPE_STRING inputs
    under numpy 2, so we refuse to start rather than serve wrong answers.
    """
    python3 = shutil.which("python3", path=env["PATH"])
    if python3 is None:
        raise LaunchError("no python3 on PATH for the Python backend stub")
    code = (
        "import sys, importlib.metadata as m\n"
        "try: v = m.version('numpy')\n"
        "except m.PackageNotFoundError: v = ''\n"
        "print(f'{sys.version_info[0]}.{sys.version_info[1]} {v}')"
    )
    out = subprocess.run([python3, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise LaunchError(f"{python3} failed: {out.stderr.strip()}")
    version, _, numpy_version = out.stdout.strip().partition(" ")
    if not numpy_version:
        raise LaunchError(f"numpy is not installed for {python3}, which the backend stub uses")
    if int(numpy_version.split(".")[0]) >= 2:
        raise LaunchError(
            f"numpy {numpy_version} is installed for {python3}; the Python backend of "
            "tritonserver 2.51 needs numpy<2 (under numpy 2 it returns empty outputs and "
            "crashes on string inputs). Run: pip install 'numpy<2'"
        )
    if version != stub_python_version():
        raise LaunchError(
            f"{python3} is Python {version} but the backend stub is for Python "
            f"{stub_python_version()}; run embed-server with the environment's own Python"
        )


# ---------------------------------------------------------------- talking to the server


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket (tritonserver's HTTP server behind the front end)."""

    def __init__(self, path: str, timeout: float = 5.0):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


UNIX_SCHEME = "http+unix://"


def unix_url(socket_path: str) -> str:
    """`http+unix://<socket path, percent-encoded>`: http_request sends to that socket."""
    return UNIX_SCHEME + urllib.parse.quote(socket_path, safe="")


def http_request(url: str, data: Optional[bytes] = None, timeout: float = 5.0, headers: Optional[dict] = None):
    """(status, parsed JSON or None); status 0 when nothing answers. `url` may be
    `http+unix://<socket>/path` (see unix_url)."""
    method = "POST" if data is not None else "GET"
    try:
        if url.startswith(UNIX_SCHEME):
            socket_part, _, path = url[len(UNIX_SCHEME):].partition("/")
            connection = UnixHTTPConnection(urllib.parse.unquote(socket_part), timeout)
            try:
                connection.request(method, "/" + path, body=data, headers=dict(headers or {}))
                response = connection.getresponse()
                body, status = response.read(), response.status
            finally:
                connection.close()
        else:
            request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
                status = response.status
    except urllib.error.HTTPError as err:
        body, status = err.read(), err.code
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, OSError):
        return 0, None
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, None


_LOAD_FAILURE = re.compile(r"failed to load '([^']+)' version \d+: (.*)")


def failures_from_log(text: str) -> dict:
    """{model: reason} from tritonserver's log lines `failed to load 'm' version 1: ...`."""
    found = {}
    for line in text.splitlines():
        match = _LOAD_FAILURE.search(line)
        if match:
            found.setdefault(match.group(1), match.group(2).strip())
    return found


def short_reason(reason: str) -> str:
    """A load failure's reason without the Python traceback and Triton's wrapper words."""
    reason = reason.replace("\\n", "\n")  # the log escapes newlines
    reason = reason.split("\n\nAt:")[0].strip()
    for prefix in ("Internal: ", "TritonModelException: "):
        if reason.startswith(prefix):
            reason = reason[len(prefix):]
    reason = reason.rstrip('"').strip() or "no reason given"
    if "No module named 'embed_core'" in reason:
        reason += (" (install virnuc-embed into the environment whose python3 is first on tritonserver's "
                   "PATH: the Python backend stub imports from there)")
    return reason


def format_failures(failures: dict) -> str:
    lines = [f"{len(failures)} model(s) failed to load:"]
    for name, reason in sorted(failures.items()):
        lines.append(f"  {name}: {short_reason(reason)}")
    return "\n".join(lines)


try:  # resolved here, not in the forked child, where an import could deadlock
    import ctypes

    _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None
PR_SET_PDEATHSIG = 1


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
        o = self.options
        admin = ",".join(frontend.ADMIN_APIS) + f":{self.admin_header}={self._admin_value}"
        # The HTTP server is reachable only through the front end, which gates every admin API
        # itself; the model-repository index stays unrestricted there for the launcher's checks.
        http_admin = ",".join(a for a in frontend.ADMIN_APIS if a != "model-repository")
        http_admin += f":{self.admin_header}={self._admin_value}"
        cmd = [
            str(binary),
            f"--model-repository={o.model_repository}",
            f"--backend-directory={backend_dir}",
            # Reachable only through the front end (the port is unused for a Unix socket).
            f"--http-address=unix:{self.http_socket}",
            f"--grpc-address={'unix:' + self.grpc_socket if o.grpc_max_request_bytes else o.address}",
            f"--metrics-address=unix:{self.metrics_socket}",
            f"--http-port={o.http_port}",
            f"--grpc-port={o.grpc_port}",
            f"--metrics-port={o.metrics_port}",
            f"--http-restricted-api={http_admin}",
            f"--grpc-restricted-protocol={admin}",
        ]
        if o.api_key:
            cmd.append(f"--http-restricted-api=inference:{frontend.API_KEY_HEADER}={o.api_key}")
            cmd.append(f"--grpc-restricted-protocol=inference:{frontend.API_KEY_HEADER}={o.api_key}")
        grpc_tls = o.tls and not o.grpc_max_request_bytes  # else TLS ends at the gRPC proxy
        if grpc_tls and o.tls_client_ca is not None:
            cmd += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={o.tls_client_ca}"]
        elif grpc_tls:
            cmd.append("--grpc-use-ssl=true")
        if grpc_tls:
            cmd += [f"--grpc-server-cert={o.tls_cert}", f"--grpc-server-key={o.tls_key}"]
        defaults = [
            f"--backend-config=python,shm-default-byte-size={o.shm_byte_size}",
            f"--backend-config=python,shm-growth-byte-size={o.shm_byte_size}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--strict-readiness=true",
            # Keep serving after a load failure so the launcher can read each model's
            # reason from the repository index; the launcher then stops it and fails.
            "--exit-on-error=false",
            "--exit-timeout-secs=10",
        ]
        if self.use_cpu_configs:
            cmd.append("--model-config-name=cpu")
        if o.log_verbose:
            defaults.append(f"--log-verbose={o.log_verbose}")
        overridden = {option_name(arg) for arg in o.triton_args}
        cmd += [arg for arg in defaults if option_name(arg) not in overridden]
        return cmd + list(o.triton_args)

    def ssl_context(self) -> Optional[ssl.SSLContext]:
        """The front end's HTTPS context, from the same files as gRPC's TLS."""
        o = self.options
        if not o.tls:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(str(o.tls_cert), str(o.tls_key))
            if o.tls_client_ca is not None:
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(str(o.tls_client_ca))
        except (ssl.SSLError, OSError) as err:
            raise LaunchError(f"cannot use the TLS certificate {o.tls_cert} and key {o.tls_key}: {err}") from None
        return context

    def start_frontend(self) -> None:
        o = self.options
        raise_open_files_limit()
        self.frontend = frontend.Frontend(frontend.FrontendOptions(
            host=o.address, port=o.http_port, backend_socket=self.http_socket,
            max_body_bytes=o.max_request_bytes, ssl_context=self.ssl_context(),
            admin_key=o.admin_key, api_key=o.api_key,
            backend_admin_header=self.admin_header, backend_admin_key=self._admin_value,
        ))
        self.metrics_frontend = frontend.Frontend(frontend.FrontendOptions(
            host=o.address, port=o.metrics_port, backend_socket=self.metrics_socket,
            max_body_bytes=0, metrics_only=True,
        ))
        for label, port, front in (("HTTP", o.http_port, self.frontend), ("metrics", o.metrics_port,
                                                                          self.metrics_frontend)):
            try:
                front.start()
            except OSError as err:
                reason = "already in use" if err.errno == 98 else str(err)
                raise LaunchError(f"cannot listen on {label} {o.address}:{port}: {reason}") from None

    def start_grpc_proxy(self) -> None:
        """With --grpc-max-request-bytes; started after tritonserver is forked (gRPC's threads
        and fork() do not mix)."""
        o = self.options
        try:
            from .grpc_proxy import GrpcProxy
        except ImportError as err:
            raise LaunchError(f"--grpc-max-request-bytes needs grpcio ({err}): pip install grpcio") from None
        self.grpc_proxy = GrpcProxy(o.address, o.grpc_port, f"unix:{self.grpc_socket}:{o.grpc_port}",
                                    o.grpc_max_request_bytes, self.grpc_credentials())
        try:
            self.grpc_proxy.start()
        except OSError as err:
            self.grpc_proxy = None
            reason = "already in use" if err.errno == 98 else str(err)
            raise LaunchError(f"cannot listen on gRPC {o.address}:{o.grpc_port}: {reason}") from None

    def grpc_credentials(self):
        """The gRPC proxy's TLS credentials, from the same files as HTTPS; None without TLS."""
        o = self.options
        if not o.tls:
            return None
        import grpc

        return grpc.ssl_server_credentials(
            [(o.tls_key.read_bytes(), o.tls_cert.read_bytes())],
            root_certificates=o.tls_client_ca.read_bytes() if o.tls_client_ca else None,
            require_client_auth=o.tls_client_ca is not None,
        )

    def start(self) -> "TritonServer":
        """Start tritonserver and return once every model is ready; LaunchError otherwise."""
        o = self.options
        binary = find_tritonserver(o.tritonserver)
        env = server_env(binary)
        check_stub_python(env)
        self.use_cpu_configs = o.cpu if o.cpu is not None else not gpu_visible()
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


def option_name(arg: str) -> str:
    """What a tritonserver option sets: its name, or for --backend-config its backend and key."""
    if arg.startswith("--backend-config="):
        return arg.rsplit("=", 1)[0]
    return arg.split("=", 1)[0]


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
