"""The checks the front end makes on a parsed request before anything reaches tritonserver: is
its path one of Triton's routes and which API (admin APIs and inference gated by the keys, in
constant time), and does its JSON nest too deep for Triton's recursive parser."""

from __future__ import annotations

import asyncio
import hmac
import re
from typing import Optional

from .http_parsing import HttpError, Request, declared_body

ADMIN_HEADER = "admin-key"
API_KEY_HEADER = "x-api-key"
# Triton's gRPC server expects a restricted protocol's header under this prefix.
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
ADMIN_APIS = ("shared-memory", "model-repository", "logging", "trace")

# JSON nested deeper than this is refused: tritonserver 2.51 parses request JSON recursively
# (rapidjson) and a body of nothing but 2,000,000 '[' overflows its stack (SIGSEGV), well
# under any sensible size limit. KServe v2 requests nest about 6 levels deep.
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = bytes(c for c in range(256) if c not in b"[]{}")
_OPEN_RUN = re.compile(rb"[\[{]{%d}" % (MAX_JSON_DEPTH + 1))
_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as int8
# Triton 2.51's HTTP routes (http_server.cc), anchored: (regex on the path, API, suffix group)
_MODEL = re.compile(
    r"^/v2/models/([^/]+)(?:/versions/([0-9]+))?(?:/(infer|generate|generate_stream|ready|config|stats|trace/setting))?$"
)
_ROUTES = (
    (re.compile(r"^/v2/health/(?:live|ready)$"), "health"),
    (re.compile(r"^/v2$"), "metadata"),
    (re.compile(r"^/v2/models/stats$"), "statistics"),
    (re.compile(r"^/v2/repository(?:/[^/]+)?/(?:index|models/[^/]+/(?:load|unload))$"), "model-repository"),
    (re.compile(r"^/v2/(?:system|cuda)sharedmemory(?:/region/[^/]+)?/(?:status|register|unregister)$"), "shared-memory"),
    (re.compile(r"^/v2/trace/setting$"), "trace"),
    (re.compile(r"^/v2/logging$"), "logging"),
)
_MODEL_SUFFIX = {
    None: "metadata", "infer": "inference", "generate": "inference", "generate_stream": "inference",
    "ready": "health", "config": "model-config", "stats": "statistics", "trace/setting": "trace",
}


def classify(path: str) -> Optional[str]:
    """Triton's API group for a request path (as Triton routes it), or None if Triton has no such route."""
    for pattern, api in _ROUTES:
        if pattern.match(path):
            return api
    match = _MODEL.match(path)
    if match:
        return _MODEL_SUFFIX[match.group(3)]
    return None


INLINE_JSON_CHECK_BYTES = 256 * 1024   # check_json: bodies up to this are checked on the event loop


def json_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when the JSON text in `body` nests deeper than `limit` (or its brackets do not
    balance, which a JSON parser refuses anyway). Strings are skipped; linear time."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKET)
    if len(brackets) <= limit:
        return False
    if _OPEN_RUN.search(brackets):  # the common attack, found cheaply
        return True
    passes = 2  # drop empty pairs (each pass one level: arrays of scalars vanish), in C
    for _ in range(passes):
        brackets = brackets.replace(b"[]", b"").replace(b"{}", b"")
    if len(brackets) <= limit - passes:
        return False
    import numpy as np

    steps = np.frombuffer(brackets.translate(_STEP), dtype=np.int8)
    depth = np.cumsum(steps, dtype=np.int32)
    return bool(depth.max() > limit - passes or depth.min() < 0)


def _same(given: Optional[bytes], expected: str) -> bool:
    return given is not None and hmac.compare_digest(given, expected.encode())


def authorize(o, request: Request) -> None:
    """Sets request.api, or raises the HttpError that refuses the request (404, 403, 401, ...)."""
    path = request.target.split(b"?", 1)[0].decode("ascii")
    if "%" in path:
        raise HttpError(400, "percent-encoded request paths are not served")
    if o.metrics_only:
        if path != "/metrics":
            raise HttpError(404, f"no such endpoint: {path} (this port serves /metrics)")
        if request.method not in (b"GET", b"HEAD"):
            raise HttpError(405, "/metrics answers GET only", ("Allow: GET, HEAD",))
        if declared_body(request):
            raise HttpError(413, "/metrics takes no request body")
        request.api = "metrics"
        return
    api = classify(path)
    if api is None:
        raise HttpError(404, f"no such endpoint: {path}")
    request.api = api

    def given(name: str) -> Optional[bytes]:
        values = request.header(name.encode()) or request.header((GRPC_HEADER_PREFIX + name).encode())
        return values[0] if len(values) == 1 else None

    if api in ADMIN_APIS:
        if not o.admin_key:
            raise HttpError(403, f"the {api} API is disabled on this server (embed-server enables it with "
                                 "an admin key: --admin-key-file or EMBED_ADMIN_KEY)")
        if not _same(given(ADMIN_HEADER), o.admin_key):
            raise HttpError(403, f"the {api} API needs the {ADMIN_HEADER} header with the server's admin key")
    elif api == "inference" and o.api_key:
        if not _same(given(API_KEY_HEADER), o.api_key):
            raise HttpError(401, f"inference needs the {API_KEY_HEADER} header with the server's API key",
                            (f'WWW-Authenticate: ApiKey header="{API_KEY_HEADER}"',))


async def check_json(request: Request, body: bytes) -> None:
    """400 when the request's JSON (before any binary tensor data) nests over MAX_JSON_DEPTH."""
    if not body:
        return
    header = request.header(b"inference-header-content-length")
    json_part = body
    if header and header[0].isdigit() and int(header[0]) <= len(body):
        json_part = body[:int(header[0])]  # binary tensor data follows the JSON header
    # Bodies of a few MB are scanned off the event loop; a small one (nearly all) is checked here.
    if len(json_part) <= INLINE_JSON_CHECK_BYTES:
        too_deep = json_too_deep(json_part)
    else:
        too_deep = await asyncio.get_running_loop().run_in_executor(None, json_too_deep, json_part)
    if too_deep:
        raise HttpError(400, f"request JSON nested deeper than {MAX_JSON_DEPTH} levels (or unbalanced)")
