"""embed-server's HTTP front end: the only door to Triton's HTTP/REST API.

Why it exists: tritonserver 2.51's HTTP server (libevhtp) parses the body of any request
whose Content-Type is `application/x-www-form-urlencoded` (what `curl -d` and Python's
urllib send by default) as a query string, into two buffers of the body's length on the
stack of an 8 MB HTTP thread (`evhtp_parse_query_wflags`, called from
`htp.request_parse_fini_`); a body of about 4.2 MB or more overflows that stack and the
whole server dies of SIGSEGV before Triton sees the request (upstream server#5840). Triton
has no option for a body size limit, so the limit lives here, in front of it:

- Triton's HTTP server listens on a Unix socket in embed-server's private (0700) work
  directory, so nothing else on the host reaches it; this front end listens on the HTTP
  port, in asyncio (stdlib only), and forwards each request over that socket.
- Bodies over `max_body_bytes` are refused with 413 naming the limit before they are read;
  request heads over `max_head_bytes` get 431, request targets over 8 KiB 414, malformed
  requests 400, all before Triton sees anything. The form-urlencoded Content-Type (never
  meaningful to Triton) is dropped, so even a body under the limit never reaches evhtp's
  query parser.
- Only Triton's known routes are forwarded. The admin APIs (shared memory, model repository,
  logging, trace) need the admin key header and are refused outright when no admin key is
  configured; inference needs the API key header when one is configured; health, metadata,
  model config and statistics stay open. Keys are compared in constant time.
- Optional TLS (HTTPS, optionally with client certificates), slow-client timeouts, and a cap
  on the request bytes held in memory at once (503 beyond it).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import re
import socket
import ssl
import threading
from typing import Optional

ADMIN_HEADER = "admin-key"
API_KEY_HEADER = "x-api-key"
# Triton's gRPC server expects a restricted protocol's header under this prefix.
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
ADMIN_APIS = ("shared-memory", "model-repository", "logging", "trace")

MAX_TARGET = 8192
METHODS = (b"GET", b"HEAD", b"POST")
MAX_HEADER_LINE = 8000  # tritonserver's parser drops the connection at about 8,190 per name or value
LINGER_BYTES = 256 * 1024 * 1024  # read and dropped after an error answer, at most
LINGER_SECONDS = 10.0
# JSON nested deeper than this is refused: tritonserver 2.51 parses request JSON recursively
# (rapidjson) and a body of nothing but 2,000,000 '[' overflows its stack (SIGSEGV), well
# under any sensible size limit. KServe v2 requests nest about 6 levels deep.
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = bytes(c for c in range(256) if c not in b"[]{}")
_OPEN_RUN = re.compile(rb"[\[{]{%d}" % (MAX_JSON_DEPTH + 1))
_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as int8
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HOP_BY_HOP = {
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"transfer-encoding", b"upgrade", b"expect", b"content-length",
}
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


@dataclasses.dataclass(frozen=True)
class FrontendOptions:
    host: str
    port: int
    backend_socket: str                      # Triton's HTTP server (a Unix socket path)
    max_body_bytes: int = 32 * 1024 * 1024
    max_head_bytes: int = 64 * 1024
    max_buffered_bytes: int = 512 * 1024 * 1024  # request bodies held in memory at once, all clients
    max_connections: int = 2048              # open client connections; more get 503 and are closed
    ssl_context: Optional[ssl.SSLContext] = None
    admin_key: Optional[str] = dataclasses.field(default=None, repr=False)
    api_key: Optional[str] = dataclasses.field(default=None, repr=False)
    # What the front end sends Triton for the admin APIs (Triton's own restriction, behind ours).
    backend_admin_header: str = ADMIN_HEADER
    backend_admin_key: Optional[str] = dataclasses.field(default=None, repr=False)
    metrics_only: bool = False               # serve GET /metrics only (Triton's metrics server)
    head_timeout_s: float = 30.0             # a request head must arrive within this
    idle_timeout_s: float = 75.0             # a kept-alive connection with no request is closed
    read_timeout_s: float = 60.0             # each read of a body must deliver within this
    backend_timeout_s: float = 3600.0        # Triton's answer must start within this


class NoAnswer(Exception):
    """The backend connection ended before any byte of an answer."""


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: tuple = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


_REASONS = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required", 413: "Content Too Large", 414: "URI Too Long", 431: "Request Header Fields Too Large",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}


def error_response(status: int, message: str, headers: tuple = ()) -> bytes:
    body = json.dumps({"error": message}).encode()
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Connection: close", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclasses.dataclass
class Request:
    method: bytes
    target: bytes
    version: bytes
    headers: list            # [(name lower-case bytes, name bytes, value bytes)]
    keep_alive: bool
    api: Optional[str] = None

    def header(self, name: bytes) -> list:
        return [value for lower, _, value in self.headers if lower == name]


def parse_head(head: bytes) -> Request:
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise HttpError(400, "malformed method")
    if method not in METHODS:  # tritonserver's parser drops the connection on methods it does not know
        raise HttpError(405, "only GET, HEAD and POST are served", ("Allow: GET, HEAD, POST",))
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpError(505 if version.startswith(b"HTTP/") else 400, "only HTTP/1.0 and HTTP/1.1 are served")
    if len(target) > MAX_TARGET:
        raise HttpError(414, f"request target over {MAX_TARGET} bytes")
    if not target.startswith(b"/") or any(c < 0x21 or c > 0x7E for c in target):
        raise HttpError(400, "malformed request target")
    headers = []
    for line in lines[1:]:
        if len(line) > MAX_HEADER_LINE:
            raise HttpError(431, f"a header line over {MAX_HEADER_LINE:,} bytes")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise HttpError(400, "malformed header line")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise HttpError(400, "control character in a header value")
        headers.append((name.lower(), name, value))
    connection = b",".join(v for n, _, v in headers if n == b"connection").lower()
    if version == b"HTTP/1.1":
        keep_alive = b"close" not in connection
    else:
        keep_alive = b"keep-alive" in connection
    return Request(method, target, version, headers, keep_alive)


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


def declared_body(request: Request) -> int:
    """The body bytes a request announces: its Content-Length, LINGER_BYTES when chunked or
    unparseable, 0 when it has none."""
    if request.header(b"transfer-encoding"):
        return LINGER_BYTES
    lengths = request.header(b"content-length")
    if not lengths:
        return 0
    text = lengths[0].strip()
    return int(text) if text.isdigit() and len(text) <= 18 else LINGER_BYTES


def _same(given: Optional[bytes], expected: str) -> bool:
    return given is not None and hmac.compare_digest(given, expected.encode())


class Frontend:
    """Runs the front end in its own thread and event loop: start(), then stop()."""

    def __init__(self, options: FrontendOptions):
        self.options = options
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._server = None
        self._buffered = 0
        self.counts = {"forwarded": 0, "refused": 0}
        self._connections = 0

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "Frontend":
        ready = threading.Event()
        failure = []

        def run():
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(self._listen())
            except BaseException as err:  # noqa: BLE001 - handed to start()
                failure.append(err)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="embed-server-http-frontend", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    async def _listen(self):
        o = self.options
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and
        # without it every answer written in two parts waits ~40 ms for a delayed ACK
        sock = socket.socket(socket.AF_INET6 if ":" in o.host else socket.AF_INET, socket.SOCK_STREAM,
                             socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((o.host, o.port))
        except OSError:
            sock.close()
            raise
        sock.listen(1024)
        return await asyncio.start_server(
            self._client, sock=sock, ssl=o.ssl_context, limit=o.max_head_bytes,
            ssl_handshake_timeout=10.0 if o.ssl_context else None,
        )

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return

        async def shutdown():
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            loop.stop()

        if loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), loop)
            self._thread.join(10)
        self._loop = None
        self._thread = None

    # ------------------------------------------------------------ one client connection

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        if self._connections >= self.options.max_connections:
            self.counts["refused"] += 1
            try:
                writer.write(error_response(503, "too many open connections; retry shortly", ("Retry-After: 1",)))
                await asyncio.wait_for(writer.drain(), 5)
            except (ConnectionError, asyncio.TimeoutError, OSError, RuntimeError, ssl.SSLError):
                pass
            self._close(writer)
            return
        self._connections += 1
        try:
            await self._serve_connection(reader, writer)
        finally:
            self._connections -= 1

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        backend = None
        first = True
        unread = 0  # body bytes the client is still expected to send (for a lingering close)
        try:
            while True:
                unread = 0
                timeout = self.options.head_timeout_s if first else self.options.idle_timeout_s
                first = False
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
                except asyncio.IncompleteReadError as err:
                    if err.partial.strip():
                        raise HttpError(400, "incomplete request head") from None
                    return
                except asyncio.LimitOverrunError:
                    raise HttpError(431, f"request head over {self.options.max_head_bytes} bytes") from None
                except asyncio.TimeoutError:  # idle, or a head trickling in too slowly: hang up
                    return
                request = parse_head(head)
                unread = declared_body(request)
                self._authorize(request)
                reserved = 0
                try:
                    body, reserved = await self._read_body(request, reader, writer)
                    unread = 0
                    await self._check_json(request, body)
                    fresh = backend is None
                    if fresh:
                        backend = await self._open_backend()
                    try:
                        keep_backend = await self._forward(request, body, backend, writer)
                    except NoAnswer:
                        self._close(backend[1])
                        backend = None
                        if fresh:
                            raise HttpError(502, "tritonserver closed the connection without an answer") from None
                        # a kept-alive connection tritonserver had closed: once more on a new one
                        backend = await self._open_backend()
                        try:
                            keep_backend = await self._forward(request, body, backend, writer)
                        except NoAnswer:
                            raise HttpError(502, "tritonserver closed the connection without an answer") from None
                finally:
                    self._buffered -= reserved
                self.counts["forwarded"] += 1
                if not keep_backend:
                    self._close(backend[1])
                    backend = None
                    if keep_backend is None:  # the answer ended with the backend's close
                        return
                if not request.keep_alive:
                    return
        except HttpError as err:
            self.counts["refused"] += 1
            try:
                writer.write(error_response(err.status, err.message, err.headers))
                await asyncio.wait_for(writer.drain(), 10)
                if unread:
                    await self._linger(reader, writer, unread)
            except (ConnectionError, asyncio.TimeoutError, OSError, RuntimeError, ssl.SSLError):
                pass
        except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                OSError, ssl.SSLError, ValueError):  # ValueError: a malformed chunk from tritonserver
            pass
        finally:
            if backend is not None:
                self._close(backend[1])
            self._close(writer)

    async def _linger(self, reader, writer, unread: int) -> None:
        """After an error answer to a request whose body was not read: stop sending, then read
        and drop that body (at most LINGER_BYTES, for at most LINGER_SECONDS), so that a client
        that writes its whole body before reading (Python's http.client, requests) reads the
        answer instead of a connection reset."""
        if writer.can_write_eof():
            writer.write_eof()
        left = min(unread, LINGER_BYTES)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LINGER_SECONDS
        while left > 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            chunk = await asyncio.wait_for(reader.read(min(left, 1 << 20)), remaining)
            if not chunk:
                return
            left -= len(chunk)

    @staticmethod
    def _close(writer: asyncio.StreamWriter) -> None:
        try:
            writer.close()
        except (ConnectionError, OSError, RuntimeError):
            pass

    def _authorize(self, request: Request) -> None:
        o = self.options
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

    async def _read_body(self, request: Request, reader, writer):
        """(body, bytes reserved from the buffer budget)."""
        o = self.options
        encodings = [v.strip().lower() for value in request.header(b"transfer-encoding") for v in value.split(b",")]
        lengths = {v.strip() for v in request.header(b"content-length")}
        if encodings and lengths:
            raise HttpError(400, "both Transfer-Encoding and Content-Length")
        if encodings and encodings != [b"chunked"]:
            raise HttpError(501, "only the chunked transfer coding is served")
        if len(lengths) > 1:
            raise HttpError(400, "conflicting Content-Length headers")
        limit_text = f"this server's limit of {o.max_body_bytes:,} bytes (embed-server --max-request-bytes)"
        length = 0
        if lengths:
            text = lengths.pop()
            if not text.isdigit() or len(text) > 18:
                raise HttpError(400, "malformed Content-Length")
            length = int(text)
            if length > o.max_body_bytes:
                raise HttpError(413, f"request body of {length:,} bytes is over {limit_text}")
        reserve = length if lengths or not encodings else o.max_body_bytes
        if self._buffered + reserve > o.max_buffered_bytes:
            raise HttpError(503, "too many large requests in flight; retry shortly", ("Retry-After: 1",))
        self._buffered += reserve
        try:
            if any(v.lower() == b"100-continue" for v in request.header(b"expect")):
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await writer.drain()
            if encodings:
                body = await self._read_chunked(reader, limit_text)
            else:
                body = await self._read_exactly(reader, length)
        except BaseException:
            self._buffered -= reserve
            raise
        return body, reserve

    async def _check_json(self, request: Request, body: bytes) -> None:
        if not body:
            return
        header = request.header(b"inference-header-content-length")
        json_part = body
        if header and header[0].isdigit() and int(header[0]) <= len(body):
            json_part = body[:int(header[0])]  # binary tensor data follows the JSON header
        too_deep = await asyncio.get_running_loop().run_in_executor(None, json_too_deep, json_part)
        if too_deep:
            raise HttpError(400, f"request JSON nested deeper than {MAX_JSON_DEPTH} levels (or unbalanced)")

    async def _read_exactly(self, reader, n: int) -> bytes:
        parts, left = [], n
        while left:
            try:
                chunk = await asyncio.wait_for(reader.read(min(left, 1 << 20)), self.options.read_timeout_s)
            except asyncio.TimeoutError:
                raise HttpError(408, f"request body stalled for {self.options.read_timeout_s:.0f} s") from None
            if not chunk:
                raise asyncio.IncompleteReadError(b"", left)
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    async def _read_chunked(self, reader, limit_text: str) -> bytes:
        parts, total = [], 0
        t = self.options.read_timeout_s
        while True:
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\r\n"), t)
            except asyncio.LimitOverrunError:
                raise HttpError(400, "malformed chunk size line") from None
            size_text = line[:-2].split(b";", 1)[0].strip()
            if not size_text or len(size_text) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
                raise HttpError(400, "malformed chunk size")
            size = int(size_text, 16)
            if size == 0:
                break
            total += size
            if total > self.options.max_body_bytes:
                raise HttpError(413, f"chunked request body over {limit_text}")
            parts.append(await self._read_exactly(reader, size))
            if await asyncio.wait_for(reader.readexactly(2), t) != b"\r\n":
                raise HttpError(400, "malformed chunk")
        while True:  # trailers: read and dropped
            line = await asyncio.wait_for(reader.readuntil(b"\r\n"), t)
            if line == b"\r\n":
                break
        return b"".join(parts)

    async def _open_backend(self):
        try:
            return await asyncio.open_unix_connection(self.options.backend_socket, limit=self.options.max_head_bytes)
        except (OSError, ConnectionError):
            raise HttpError(503, "tritonserver is not accepting requests (starting or stopping)",
                            ("Retry-After: 5",)) from None

    def _backend_head(self, request: Request, body: bytes) -> bytes:
        o = self.options
        lines = [request.method + b" " + request.target + b" HTTP/1.1"]
        drop = set(_HOP_BY_HOP) | {ADMIN_HEADER.encode(), API_KEY_HEADER.encode(),
                                    (GRPC_HEADER_PREFIX + ADMIN_HEADER).encode(),
                                    (GRPC_HEADER_PREFIX + API_KEY_HEADER).encode(),
                                    o.backend_admin_header.lower().encode()}
        for lower, name, value in request.headers:
            if lower in drop:
                continue
            if lower == b"content-type" and value.lower().startswith(b"application/x-www-form-urlencoded"):
                continue  # evhtp would parse the body as a query string (the 2.51 crash)
            lines.append(name + b": " + value)
        if request.api in ADMIN_APIS and o.backend_admin_key:
            lines.append(o.backend_admin_header.encode() + b": " + o.backend_admin_key.encode())
        if request.api == "inference" and o.api_key:
            lines.append(API_KEY_HEADER.encode() + b": " + o.api_key.encode())
        if body or request.method not in (b"GET", b"HEAD", b"DELETE", b"OPTIONS"):
            lines.append(b"Content-Length: " + str(len(body)).encode())
        return b"\r\n".join(lines) + b"\r\n\r\n"

    async def _forward(self, request: Request, body: bytes, backend, writer) -> Optional[bool]:
        """Sends the request to Triton and relays its answer. True: the backend connection can
        be reused; False: it cannot; None: it cannot and neither can the client's."""
        back_reader, back_writer = backend
        try:
            back_writer.write(self._backend_head(request, body))
            if body:
                back_writer.write(body)
            await back_writer.drain()
            head = await asyncio.wait_for(back_reader.readuntil(b"\r\n\r\n"), self.options.backend_timeout_s)
        except asyncio.IncompleteReadError as err:
            if err.partial:
                raise HttpError(502, "tritonserver broke off its answer") from None
            raise NoAnswer() from None
        except (ConnectionError, OSError):
            raise NoAnswer() from None
        except (asyncio.LimitOverrunError, asyncio.TimeoutError):
            raise HttpError(502, "no well-formed answer from tritonserver in time") from None
        del body
        lines = head[:-4].split(b"\r\n")
        status_parts = lines[0].split(b" ", 2)
        try:
            status = int(status_parts[1])
        except (IndexError, ValueError):
            raise HttpError(502, "malformed answer from tritonserver") from None
        headers = [line.partition(b":") for line in lines[1:]]
        fields = {n.strip().lower(): v.strip() for n, _, v in headers}
        # after HEAD, evhtp may or may not send a body: do not reuse that connection
        reusable = b"close" not in fields.get(b"connection", b"").lower() and request.method != b"HEAD"
        out = [lines[0]] + [n + b":" + v for n, _, v in headers
                            if n.strip().lower() not in (b"connection", b"keep-alive")]
        chunked = b"chunked" in fields.get(b"transfer-encoding", b"").lower()
        no_body = request.method == b"HEAD" or status in (204, 304) or 100 <= status < 200
        until_close = not no_body and not chunked and b"content-length" not in fields
        client_keeps = request.keep_alive and not until_close
        out.append(b"Connection: keep-alive" if client_keeps else b"Connection: close")
        writer.write(b"\r\n".join(out) + b"\r\n\r\n")
        if no_body:
            pass
        elif chunked:
            await self._relay_chunked(back_reader, writer)
        elif not until_close:
            await self._relay(back_reader, writer, int(fields[b"content-length"]))
        else:
            await self._relay(back_reader, writer, None)
            await self._drain(writer)
            return None
        await self._drain(writer)
        if not client_keeps:
            request.keep_alive = False
        return reusable

    async def _drain(self, writer) -> None:
        """A client that stops reading its answer is dropped after read_timeout_s."""
        await asyncio.wait_for(writer.drain(), self.options.read_timeout_s)

    async def _relay(self, reader, writer, n: Optional[int]) -> None:
        t = self.options.backend_timeout_s
        while n is None or n > 0:
            chunk = await asyncio.wait_for(reader.read(1 << 20 if n is None else min(n, 1 << 20)), t)
            if not chunk:
                if n is None:
                    return
                raise ConnectionError("tritonserver closed mid-answer")
            writer.write(chunk)
            await self._drain(writer)
            if n is not None:
                n -= len(chunk)

    async def _relay_chunked(self, reader, writer) -> None:
        t = self.options.backend_timeout_s
        while True:
            line = await asyncio.wait_for(reader.readuntil(b"\r\n"), t)
            writer.write(line)
            size = int(line[:-2].split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while True:
                    trailer = await asyncio.wait_for(reader.readuntil(b"\r\n"), t)
                    writer.write(trailer)
                    if trailer == b"\r\n":
                        return
            await self._relay(reader, writer, size + 2)
