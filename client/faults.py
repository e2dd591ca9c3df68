"""Which gRPC failures are retried (the server or the connection failed) and which reject a
sequence (the server names bad input): one rule for the server connection and the shared queue."""

from __future__ import annotations

RETRIABLE = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED",
             "StatusCode.RESOURCE_EXHAUSTED"}
REJECTED = {"StatusCode.INVALID_ARGUMENT"}
# Transport failures that gRPC sometimes reports as INTERNAL/UNKNOWN/CANCELLED when the peer dies.
CONNECTION_MARKERS = ("socket closed", "connection reset", "stream removed", "rst_stream",
                      "broken pipe", "failed to connect", "connection refused", "goaway",
                      "end of tcp stream", "connection aborted")


def is_retriable(error: Exception) -> bool:
    """A failure of the server or the connection, not of the request: send it again."""
    status = getattr(error, "status", lambda: None)()
    if status in RETRIABLE:
        return True
    text = str(error).lower()
    return any(marker in text for marker in CONNECTION_MARKERS)


def is_rejection(error: Exception) -> bool:
    """The server refused the request's input (INVALID_ARGUMENT): a bad sequence."""
    return getattr(error, "status", lambda: None)() in REJECTED
