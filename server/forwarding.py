"""Forwarding a checked request to tritonserver over its private Unix socket and relaying the
answer to the client, with the keys and hop-by-hop headers replaced and the form-urlencoded
Content-Type dropped (the body evhtp would otherwise parse as a query string, the 2.51 crash)."""

from __future__ import annotations

import asyncio
import functools
from typing import Optional

from .http_parsing import HttpError, Request
from .request_checks import ADMIN_APIS, ADMIN_HEADER, API_KEY_HEADER, GRPC_HEADER_PREFIX

_HOP_BY_HOP = {
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"transfer-encoding", b"upgrade", b"expect", b"content-length",
}


_KEY_HEADERS = frozenset(h.encode() for h in (ADMIN_HEADER, API_KEY_HEADER, GRPC_HEADER_PREFIX + ADMIN_HEADER,
                                               GRPC_HEADER_PREFIX + API_KEY_HEADER))


@functools.lru_cache(maxsize=8)
def _dropped(backend_admin_header: str) -> frozenset:
    """The (lower-case) headers never forwarded: hop-by-hop, the client's keys, Triton's admin header."""
    return frozenset(_HOP_BY_HOP) | _KEY_HEADERS | {backend_admin_header.lower().encode()}


class NoAnswer(Exception):
    """The backend connection ended before any byte of an answer."""


async def open_backend(options):
    """A new connection to tritonserver's HTTP socket; 503 while it is not accepting."""
    try:
        return await asyncio.open_unix_connection(options.backend_socket, limit=options.max_head_bytes)
    except (OSError, ConnectionError):
        raise HttpError(503, "tritonserver is not accepting requests (starting or stopping)",
                        ("Retry-After: 5",)) from None


def backend_head(o, request: Request, body: bytes) -> bytes:
    """The request head sent to tritonserver: the client's keys and hop-by-hop headers dropped,
    Triton's own admin or API key header added where the API needs it, Content-Length set."""
    lines = [request.method + b" " + request.target + b" HTTP/1.1"]
    drop = _dropped(o.backend_admin_header)
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


async def forward(options, request: Request, body: bytes, backend, writer) -> Optional[bool]:
    """Sends the request to Triton and relays its answer. True: the backend connection can
    be reused; False: it cannot; None: it cannot and neither can the client's."""
    back_reader, back_writer = backend
    try:
        back_writer.write(backend_head(options, request, body))
        if body:
            back_writer.write(body)
        await back_writer.drain()
        head = await asyncio.wait_for(back_reader.readuntil(b"\r\n\r\n"), options.backend_timeout_s)
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
        await relay_chunked(options, back_reader, writer)
    elif not until_close:
        await relay(options, back_reader, writer, int(fields[b"content-length"]))
    else:
        await relay(options, back_reader, writer, None)
        await drain(options, writer)
        return None
    await drain(options, writer)
    if not client_keeps:
        request.keep_alive = False
    return reusable


async def drain(options, writer) -> None:
    """A client that stops reading its answer is dropped after read_timeout_s."""
    await asyncio.wait_for(writer.drain(), options.read_timeout_s)


async def relay(options, reader, writer, n: Optional[int]) -> None:
    t = options.backend_timeout_s
    while n is None or n > 0:
        chunk = await asyncio.wait_for(reader.read(1 << 20 if n is None else min(n, 1 << 20)), t)
        if not chunk:
            if n is None:
                return
            raise ConnectionError("tritonserver closed mid-answer")
        writer.write(chunk)
        await drain(options, writer)
        if n is not None:
            n -= len(chunk)


async def relay_chunked(options, reader, writer) -> None:
    t = options.backend_timeout_s
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
        await relay(options, reader, writer, size + 2)
