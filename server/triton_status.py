"""Reading tritonserver's state for the launcher: HTTP requests to its private Unix socket (which
only the front end and the launcher reach) and the model load failures in its log."""

from __future__ import annotations

import http.client
import json
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional


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
