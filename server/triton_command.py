"""The tritonserver command line embed-server runs: its HTTP, metrics (and, behind the gRPC proxy,
gRPC) servers on private Unix sockets, the admin APIs and inference restricted to the keys, gRPC
TLS, and embed-server's defaults that `--triton-arg` may replace."""

from __future__ import annotations

from pathlib import Path

from .request_checks import ADMIN_APIS, API_KEY_HEADER
from .server_options import ServerOptions

# The name Triton's admin restriction uses when no admin key is configured: upper-case letters
# are illegal in gRPC metadata keys, so no gRPC client can ever send it (and the HTTP side is
# closed by the front end); the value is random besides.
DISABLED_ADMIN_HEADER = "X-Admin-Disabled"


def option_name(arg: str) -> str:
    """What a tritonserver option sets: its name, or for --backend-config its backend and key."""
    if arg.startswith("--backend-config="):
        return arg.rsplit("=", 1)[0]
    return arg.split("=", 1)[0]


def triton_command(o: ServerOptions, binary: Path, backend_dir: Path, *, http_socket: str,
                   grpc_socket: str, metrics_socket: str, admin_header: str, admin_value: str,
                   shm_prefix: str, use_cpu_configs: bool) -> list:
    """tritonserver's argv for `o`; Triton's admin restriction is `admin_header: admin_value`."""
    admin = ",".join(ADMIN_APIS) + f":{admin_header}={admin_value}"
    # The HTTP server is reachable only through the front end, which gates every admin API
    # itself; the model-repository index stays unrestricted there for the launcher's checks.
    http_admin = ",".join(a for a in ADMIN_APIS if a != "model-repository")
    http_admin += f":{admin_header}={admin_value}"
    cmd = [
        str(binary),
        f"--model-repository={o.model_repository}",
        f"--backend-directory={backend_dir}",
        # Reachable only through the front end (the port is unused for a Unix socket).
        f"--http-address=unix:{http_socket}",
        f"--grpc-address={'unix:' + grpc_socket if o.grpc_max_request_bytes else o.address}",
        f"--metrics-address=unix:{metrics_socket}",
        f"--http-port={o.http_port}",
        f"--grpc-port={o.grpc_port}",
        f"--metrics-port={o.metrics_port}",
        f"--http-restricted-api={http_admin}",
        f"--grpc-restricted-protocol={admin}",
    ]
    if o.api_key:
        cmd.append(f"--http-restricted-api=inference:{API_KEY_HEADER}={o.api_key}")
        cmd.append(f"--grpc-restricted-protocol=inference:{API_KEY_HEADER}={o.api_key}")
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
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
        "--strict-readiness=true",
        # Keep serving after a load failure so the launcher can read each model's
        # reason from the repository index; the launcher then stops it and fails.
        "--exit-on-error=false",
        "--exit-timeout-secs=10",
    ]
    if use_cpu_configs:
        cmd.append("--model-config-name=cpu")
    if o.log_verbose:
        defaults.append(f"--log-verbose={o.log_verbose}")
    overridden = {option_name(arg) for arg in o.triton_args}
    cmd += [arg for arg in defaults if option_name(arg) not in overridden]
    return cmd + list(o.triton_args)
