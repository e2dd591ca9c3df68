"""Test TLS certificates, made with the openssl command: EC P-256 keys, PEM files, valid for a day.

tests/ is on sys.path (pytest puts a conftest's folder there), so test modules import this by name.
A test whose machine lacks the openssl command is skipped.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
LOCAL = "DNS:localhost,IP:127.0.0.1"


def openssl(*args) -> None:
    """Runs `openssl *args` (skips the test where there is no openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed for test certificates")
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def self_signed(root: Path, name: str = "server", subject: str = "/CN=localhost",
                alt_names: str | None = LOCAL) -> tuple[Path, Path]:
    """(root/<name>.crt, root/<name>.key): a self-signed certificate for `subject`, naming
    `alt_names` (subjectAltName; None: no such extension)."""
    cert, key = root / f"{name}.crt", root / f"{name}.key"
    extension = ("-addext", f"subjectAltName={alt_names}") if alt_names else ()
    openssl("req", "-x509", *EC, "-keyout", key, "-out", cert, "-days", "1", "-subj", subject,
            *extension)
    return cert, key


def signed_certificates(root: Path) -> dict:
    """A test CA, a server certificate for 127.0.0.1 / localhost and a client certificate,
    both signed by the CA: {"ca.crt", "ca.key", "server.crt", "server.key", "client.crt",
    "client.key": path under `root`}."""
    files = {name: root / name for name in ("ca.crt", "ca.key", "server.crt", "server.key",
                                            "client.crt", "client.key")}
    self_signed(root, "ca", "/CN=embed test CA", alt_names=None)
    for who, extension in (("server", f"subjectAltName={LOCAL}"),
                           ("client", "extendedKeyUsage=clientAuth")):
        request, ext = root / f"{who}.csr", root / f"{who}.ext"
        ext.write_text(extension + "\n")
        openssl("req", "-new", *EC, "-keyout", files[f"{who}.key"], "-out", request,
                "-subj", f"/CN={who}")
        openssl("x509", "-req", "-in", request, "-CA", files["ca.crt"], "-CAkey", files["ca.key"],
                "-CAcreateserial", "-out", files[f"{who}.crt"], "-days", "1", "-extfile", ext)
    return files
