"""The API key and TLS files embed-client is given: read and checked, the key never shown.

The key comes from `--api-key-file` (or $EMBED_API_KEY_FILE), else from $EMBED_API_KEY; never
from the command line, where other users of the host would see it. No message names it.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Optional

log = logging.getLogger("embed_client")

API_KEY_ENV = "EMBED_API_KEY"
API_KEY_FILE_ENV = "EMBED_API_KEY_FILE"


def env_path(name: str) -> Optional[Path]:
    value = os.environ.get(name, "").strip()
    return Path(value) if value else None


def read_api_key(path: Optional[Path]) -> Optional[str]:
    """The key from `path`, else from $EMBED_API_KEY; None when neither is set.
    ValueError (a usage error) when the file cannot be read or the key cannot be sent."""
    if path is not None:
        try:
            info = path.stat()
            key = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or type(e).__name__
            raise ValueError(f"cannot read the API key file {path}: {reason}") from None
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("the API key file %s is readable by other users (chmod 600 %s)",
                        path, path)
        where = f"the API key file {path}"
    else:
        key = os.environ.get(API_KEY_ENV, "").strip()
        where = f"${API_KEY_ENV}"
    if not key and path is None:
        return None
    if not key:
        raise ValueError(f"{where} is empty")
    if not all(33 <= ord(c) <= 126 for c in key):  # what gRPC metadata can carry
        raise ValueError(f"{where}: the key must be printable ASCII without spaces")
    return key


def check_ca_file(path: Optional[Path]) -> None:
    """ValueError when the CA file given cannot be read or holds no PEM certificate."""
    if path is None:
        return
    _require_pem(path, b"-----BEGIN CERTIFICATE-----", "CA", "certificate")


def check_client_certificate(cert: Optional[Path], key: Optional[Path]) -> None:
    """ValueError unless both or neither of the client certificate and its key are given,
    readable, and PEM (mutual TLS: embed-server --tls-client-ca)."""
    if (cert is None) != (key is None):
        raise ValueError("--tls-cert-file and --tls-key-file go together (mutual TLS)")
    for path, marker, what in ((cert, b"-----BEGIN CERTIFICATE-----", "client certificate"),
                               (key, b"PRIVATE KEY-----", "client key")):
        if path is not None:
            _require_pem(path, marker, what, what)


def _require_pem(path: Path, marker: bytes, what: str, holds: str) -> None:
    """ValueError when the TLS `what` file `path` cannot be read or lacks `marker` (no PEM
    `holds`)."""
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the TLS {what} file {path}: {e.strerror}") from None
    if marker not in text:
        raise ValueError(f"the TLS {what} file {path} holds no PEM {holds}")


def channel_args(tls_name: Optional[str]) -> list:
    """tritonclient's own channel options (2 GiB messages, its keep-alive) plus the name the
    server's certificate is checked against: given `channel_args`, tritonclient uses them
    instead of its defaults, and gRPC's default 4 MiB answer limit would cut big answers."""
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions

    keep = KeepAliveOptions()
    args = [("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keep.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keep.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keep.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keep.http2_max_pings_without_data)]
    if tls_name:
        args.append(("grpc.ssl_target_name_override", tls_name))
    return args


def open_client(url: str, config, tls_name: Optional[str] = None):
    """A tritonclient.grpc.aio client to `url` as `config` (a TransportConfig) says: plain, or
    TLS with its CA file and client certificate; `tls_name`: the name the certificate must
    carry when `url` is an address found under that name (discovery.py)."""
    import tritonclient.grpc.aio as grpcaio

    if not config.tls:
        return grpcaio.InferenceServerClient(url)

    def path(p):
        return None if p is None else str(p)

    return grpcaio.InferenceServerClient(
        url, ssl=True, root_certificates=path(config.tls_ca_file),
        private_key=path(config.tls_key_file), certificate_chain=path(config.tls_cert_file),
        channel_args=channel_args(tls_name) if tls_name else None)
