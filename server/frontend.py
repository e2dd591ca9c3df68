"""embed-server's HTTP front end, the only door to Triton's HTTP/REST API (and a second one, for
GET /metrics, to its metrics server): an asyncio server in its own thread that refuses oversized
and malformed requests before tritonserver 2.51's HTTP server, which a ~4.2 MB form-urlencoded
body kills, ever sees them."""

# Why it exists: tritonserver 2.51's HTTP server (libevhtp) parses the body of any request
# whose Content-Type is `application/x-www-form-urlencoded` (what `curl -d` and Python's
# urllib send by default) as a query string, into two buffers of the body's length on the
# stack of an 8 MB HTTP thread (`evhtp_parse_query_wflags`, called from
# `htp.request_parse_fini_`); a body of about 4.2 MB or more overflows that stack and the
# whole server dies of SIGSEGV before Triton sees the request (upstream server#5840). Triton
# has no option for a body size limit, so the limit lives here, in front of it:
#
# - Triton's HTTP server listens on a Unix socket in embed-server's private (0700) work
#   directory, so nothing else on the host reaches it; this front end listens on the HTTP
#   port, in asyncio (stdlib only), and forwards each request over that socket.
# - Bodies over `max_body_bytes` are refused with 413 naming the limit before they are read;
#   request heads over `max_head_bytes` get 431, request targets over 8 KiB 414, malformed
#   requests 400, all before Triton sees anything. The form-urlencoded Content-Type (never
#   meaningful to Triton) is dropped, so even a body under the limit never reaches evhtp's
#   query parser.
# - Only Triton's known routes are forwarded. The admin APIs (shared memory, model repository,
#   logging, trace) need the admin key header and are refused outright when no admin key is
#   configured; inference needs the API key header when one is configured; health, metadata,
#   model config and statistics stay open. Keys are compared in constant time.
# - Optional TLS (HTTPS, optionally with client certificates), slow-client timeouts, and a cap
#   on the request bytes held in memory at once (503 beyond it).
#
# The parts: http_parsing.py (heads, bodies, limits), request_checks.py (routes, keys, JSON
# depth), forwarding.py (to tritonserver's Unix socket and back); the names the launcher, the
# CLI and the tests take from here are re-exported.

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import threading
from typing import Optional

from .forwarding import NoAnswer, forward, open_backend
from .http_parsing import (HttpError, Request, declared_body, error_response, linger, parse_head, read_chunked,
                           read_exactly)
from .loop_thread import start_loop_thread, stop_loop_thread
from .request_checks import (ADMIN_APIS, ADMIN_HEADER, API_KEY_HEADER, GRPC_HEADER_PREFIX, MAX_JSON_DEPTH, authorize,
                             check_json, classify, json_too_deep)

__all__ = [
    "ADMIN_APIS", "ADMIN_HEADER", "API_KEY_HEADER", "Frontend", "FrontendOptions", "GRPC_HEADER_PREFIX",
    "MAX_JSON_DEPTH", "classify", "json_too_deep",
]


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
        self._loop, self._thread = start_loop_thread(self._listen, "embed-server-http-frontend")
        return self

    async def _listen(self) -> None:
        o = self.options
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so (the
        # accepted ones inherit it), and without it every answer written in two parts waits
        # ~40 ms for a delayed ACK
        sock = socket.socket(socket.AF_INET6 if ":" in o.host else socket.AF_INET, socket.SOCK_STREAM,
                             socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((o.host, o.port))
        except OSError:
            sock.close()
            raise
        sock.listen(1024)
        self._server = await asyncio.start_server(
            self._client, sock=sock, ssl=o.ssl_context, limit=o.max_head_bytes,
            ssl_handshake_timeout=10.0 if o.ssl_context else None,
        )

    def stop(self) -> None:
        stop_loop_thread(self._loop, self._thread, self._server.close if self._server is not None else None)
        self._loop = None
        self._thread = None

    # ------------------------------------------------------------ one client connection

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        if self._connections >= self.options.max_connections:
            await self._refuse(reader, writer, HttpError(503, "too many open connections; retry shortly",
                                                         ("Retry-After: 1",)), drain_s=5)
            self._close(writer)
            return
        self._connections += 1
        try:
            await self._serve_connection(reader, writer)
        finally:
            self._connections -= 1

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
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
                authorize(self.options, request)
                reserved = 0
                try:
                    body, reserved = await self._read_body(request, reader, writer)
                    unread = 0
                    await check_json(request, body)
                    keep_backend, backend = await self._forward(request, body, backend, writer)
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
            await self._refuse(reader, writer, err, unread=unread)
        except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                OSError, ssl.SSLError, ValueError):  # ValueError: a malformed chunk from tritonserver
            pass
        finally:
            if backend is not None:
                self._close(backend[1])
            self._close(writer)

    async def _forward(self, request: Request, body: bytes, backend, writer):
        """(keep the backend connection?, the backend connection): `request` forwarded on `backend`
        (a new one where None). A kept-alive connection tritonserver had closed gets the request
        once more on a new one; no answer on a new one is a 502."""
        while True:
            fresh = backend is None
            if fresh:
                backend = await open_backend(self.options)
            try:
                return await forward(self.options, request, body, backend, writer), backend
            except NoAnswer:
                self._close(backend[1])
                backend = None
                if fresh:
                    raise HttpError(502, "tritonserver closed the connection without an answer") from None

    async def _refuse(self, reader, writer, err: HttpError, unread: int = 0, drain_s: float = 10) -> None:
        """The error answer, counted; a client still sending `unread` body bytes is lingered on."""
        self.counts["refused"] += 1
        try:
            writer.write(error_response(err.status, err.message, err.headers))
            await asyncio.wait_for(writer.drain(), drain_s)
            if unread:
                await linger(reader, writer, unread)
        except (ConnectionError, asyncio.TimeoutError, OSError, RuntimeError, ssl.SSLError):
            pass

    @staticmethod
    def _close(writer: asyncio.StreamWriter) -> None:
        try:
            writer.close()
        except (ConnectionError, OSError, RuntimeError):
            pass

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
        reserve = o.max_body_bytes if encodings else length   # chunked: its length is known at the end
        if self._buffered + reserve > o.max_buffered_bytes:
            raise HttpError(503, "too many large requests in flight; retry shortly", ("Retry-After: 1",))
        self._buffered += reserve
        try:
            if any(v.lower() == b"100-continue" for v in request.header(b"expect")):
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await writer.drain()
            if encodings:
                body = await read_chunked(self.options, reader, limit_text)
            else:
                body = await read_exactly(self.options, reader, length)
        except BaseException:
            self._buffered -= reserve
            raise
        return body, reserve
