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
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the TLS CA file {path}: {e.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in text:
        raise ValueError(f"the TLS CA file {path} holds no PEM certificate")
