"""What `embed-server` runs tritonserver with (`ServerOptions`), checked once when made, so that
a bad port, key, TLS file or owned tritonserver option fails before anything starts."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Optional


class LaunchError(Exception):
    """The server could not be started, or a model in the repository did not load."""


KEY_PATTERN = re.compile(r"^[A-Za-z0-9._~+/-]{16,256}$")
KEY_RULE = "16 to 256 characters from A-Z a-z 0-9 . _ ~ + / - (e.g. `openssl rand -hex 32`)"
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
