"""An optional gRPC front end: a message size limit tritonserver 2.51 does not have.

tritonserver accepts gRPC messages up to 2 GiB and holds several copies of one while the
model refuses it (measured: 7.7 GB resident for one 2 GiB - 1 message), so a few at once can
exhaust a host's memory. With `embed-server --grpc-max-request-bytes N`, tritonserver's gRPC
server listens on a Unix socket in embed-server's private work directory and this proxy serves
the gRPC port: messages over N are refused by gRPC itself (RESOURCE_EXHAUSTED, naming both
sizes) before they are read, everything else is relayed as bytes with its metadata (the API
and admin keys, which tritonserver still checks), deadline and cancellation. TLS, when
configured, ends here. It costs a hop through Python per call, which is why it is opt-in.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import threading
from typing import Dict, Optional

import grpc

from .loop_thread import start_loop_thread, stop_loop_thread

SERVICE = "/inference.GRPCInferenceService/"
STREAMING = {SERVICE + "ModelStreamInfer"}


def _metadata(context) -> tuple:
    """The caller's metadata minus what gRPC sets itself."""
    return tuple((k, v) for k, v in context.invocation_metadata()
                 if not k.startswith(":") and not k.startswith("grpc-") and k != "user-agent")


class GrpcProxy:
    """start() serves `port` in its own thread and event loop, relaying to `backend` (a gRPC
    target such as unix:/path); stop() ends it."""

    def __init__(self, host: str, port: int, backend: str, max_request_bytes: int,
                 credentials: Optional[grpc.ServerCredentials] = None):
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.backend = backend
        self.max_request_bytes = max_request_bytes
        self.credentials = credentials
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._server = None
        self._channel = None
        self._calls: Dict[str, object] = {}   # method -> the channel's callable for it, made once

    def start(self) -> "GrpcProxy":
        self._loop, self._thread = start_loop_thread(self._start, "embed-server-grpc-proxy")
        return self

    async def _start(self):
        unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        self._channel = grpc.aio.insecure_channel(self.backend, options=unlimited)
        self._server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ])
        self._server.add_generic_rpc_handlers((_Handler(self),))
        if self.credentials is not None:
            bound = self._server.add_secure_port(self.address, self.credentials)
        else:
            bound = self._server.add_insecure_port(self.address)
        if not bound:
            raise OSError(errno.EADDRINUSE, f"cannot listen on {self.address}: already in use")
        await self._server.start()

    def stop(self) -> None:
        async def close():
            await self._server.stop(grace=1.0)
            await self._channel.close()

        stop_loop_thread(self._loop, self._thread, close)
        self._loop = None
        self._thread = None

    def _call(self, method: str, streaming: bool):
        call = self._calls.get(method)
        if call is None:
            call = self._calls[method] = (self._channel.stream_stream if streaming else self._channel.unary_unary)(method)
        return call

    async def unary(self, method: str, request: bytes, context):
        call = self._call(method, False)(
            request, metadata=_metadata(context), timeout=context.time_remaining())
        try:
            return await call
        except grpc.aio.AioRpcError as err:
            await context.abort(err.code(), err.details() or "")

    async def stream(self, method: str, requests, context):
        call = self._call(method, True)(
            requests, metadata=_metadata(context), timeout=context.time_remaining())
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as err:
            await context.abort(err.code(), err.details() or "")


class _Handler(grpc.GenericRpcHandler):
    """gRPC asks service() on every call: each method's handler is made once."""

    def __init__(self, proxy: GrpcProxy):
        self.proxy = proxy
        self.handlers: Dict[str, object] = {}

    def service(self, details):
        method = details.method
        if not method.startswith(SERVICE):
            return None  # UNIMPLEMENTED
        handler = self.handlers.get(method)
        if handler is None:
            handler = self.handlers[method] = (
                grpc.stream_stream_rpc_method_handler(functools.partial(self.proxy.stream, method))
                if method in STREAMING else
                grpc.unary_unary_rpc_method_handler(functools.partial(self.proxy.unary, method)))
        return handler
