"""TLS for the ports embed-server serves itself (the HTTP front end's HTTPS, the gRPC proxy's
credentials), made from the same certificate, key and client CA files as tritonserver's gRPC TLS
so one set of files secures every port."""

from __future__ import annotations

import ssl
from typing import Optional

from .server_options import LaunchError, ServerOptions


def ssl_context(o: ServerOptions) -> Optional[ssl.SSLContext]:
    """The front end's HTTPS context, from the same files as gRPC's TLS; None without TLS."""
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


def grpc_credentials(o: ServerOptions):
    """The gRPC proxy's TLS credentials, from the same files as HTTPS; None without TLS."""
    if not o.tls:
        return None
    import grpc

    return grpc.ssl_server_credentials(
        [(o.tls_key.read_bytes(), o.tls_cert.read_bytes())],
        root_certificates=o.tls_client_ca.read_bytes() if o.tls_client_ca else None,
        require_client_auth=o.tls_client_ca is not None,
    )
