"""HTTP/1.1 for the front end: request heads parsed under limits (method, target, header lines),
bodies read by Content-Length or chunks within a deadline, and error answers, so that nothing
malformed or oversized is handed on to tritonserver's evhtp parser."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from typing import Optional

MAX_TARGET = 8192
METHODS = (b"GET", b"HEAD", b"POST")
MAX_HEADER_LINE = 8000  # tritonserver's parser drops the connection at about 8,190 per name or value
LINGER_BYTES = 256 * 1024 * 1024  # read and dropped after an error answer, at most
LINGER_SECONDS = 10.0
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class HttpError(Exception):
    """A refusal answered by the front end itself: status, message, extra header lines."""

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


async def read_exactly(options, reader, n: int) -> bytes:
    """`n` body bytes; 408 when a read stalls for options.read_timeout_s."""
    parts, left = [], n
    while left:
        try:
            chunk = await asyncio.wait_for(reader.read(min(left, 1 << 20)), options.read_timeout_s)
        except asyncio.TimeoutError:
            raise HttpError(408, f"request body stalled for {options.read_timeout_s:.0f} s") from None
        if not chunk:
            raise asyncio.IncompleteReadError(b"", left)
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


async def read_chunked(options, reader, limit_text: str) -> bytes:
    """A chunked body of at most options.max_body_bytes (413 beyond), trailers dropped."""
    parts, total = [], 0
    t = options.read_timeout_s
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
        if total > options.max_body_bytes:
            raise HttpError(413, f"chunked request body over {limit_text}")
        parts.append(await read_exactly(options, reader, size))
        if await asyncio.wait_for(reader.readexactly(2), t) != b"\r\n":
            raise HttpError(400, "malformed chunk")
    while True:  # trailers: read and dropped
        line = await asyncio.wait_for(reader.readuntil(b"\r\n"), t)
        if line == b"\r\n":
            break
    return b"".join(parts)


async def linger(reader, writer, unread: int) -> None:
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
