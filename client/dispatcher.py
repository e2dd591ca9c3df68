"""The shared request queue and every server's worker slots (`Dispatcher`): each slot pulls the
next request and sends it, so a slower server pulls less and the load spreads by itself, and a
request that failed (transport.py's "Faults") goes back to the queue for any server to take."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

import numpy as np

from .errors import ServerError, ServerUnavailableError
from .faults import is_rejection, is_retriable
from .schedule import Item, Request

if TYPE_CHECKING:   # transport.py imports this module: Server is only named in annotations here
    from .transport import Server

log = logging.getLogger("embed_client.transport")   # its name when it was in transport.py


ResultCallback = Callable[[Request, np.ndarray], None]
RejectCallback = Callable[[Request, Item, str], None]


class Dispatcher:
    """The shared request queue and the worker slots of every server."""

    _NEW, _AGAIN = 1, 0  # queue priorities: retried and split requests go first

    def __init__(self, servers: Sequence[Server], on_result: ResultCallback,
                 on_reject: RejectCallback):
        self.servers = list(servers)
        self.on_result = on_result
        self.on_reject = on_reject
        self.queue: asyncio.PriorityQueue = asyncio.PriorityQueue()
        self._order = itertools.count()
        self._tasks: List[asyncio.Task] = []
        self.error: Optional[BaseException] = None
        self.failed = asyncio.Event()
        self.closed = False
        self.joining: Callable[[], bool] = lambda: False  # servers still connecting? (servers.py)
        self.ask = None             # representations.Ask: what beyond the mean (None: the mean)
        self._sending: Dict[asyncio.Task, tuple] = {}     # slot -> (server, request) in flight

    def submit(self, requests: Sequence[Request]) -> None:
        for request in requests:
            self.queue.put_nowait((self._NEW, next(self._order), request))

    def _again(self, request: Request) -> None:
        self.queue.put_nowait((self._AGAIN, next(self._order), request))

    def start(self) -> None:
        """Every server's slots, started round-robin: the queue serves waiting slots in order,
        so while there are fewer requests than slots they spread over the servers."""
        for turn in range(max((server.in_flight for server in self.servers), default=0)):
            for server in self.servers:
                if turn < server.in_flight:
                    self._tasks.append(asyncio.ensure_future(self._worker(server)))

    def add(self, server: Server) -> bool:
        """A server that became ready after the run started joins the pull (False: too late)."""
        if self.closed:
            return False
        self.servers.append(server)
        self._start_workers(server)
        return True

    def _start_workers(self, server: Server) -> None:
        for _ in range(server.in_flight):
            self._tasks.append(asyncio.ensure_future(self._worker(server)))

    async def _worker(self, server: Server) -> None:
        from tritonclient.utils import InferenceServerException

        while not server.dead and not server.retired:
            wait = server.available_at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            _, _, request = await self.queue.get()
            if server.dead or server.retired:  # it went while this slot waited: another takes it
                self._again(request)
                return
            try:
                slot = asyncio.current_task()
                self._sending[slot] = (server, request)
                try:
                    embeddings = await server.embed(request, self.ask)
                finally:
                    self._sending.pop(slot, None)
            except InferenceServerException as e:
                if is_rejection(e):
                    self._rejected(request, e)
                elif is_retriable(e):
                    self._again(request)
                    server.failed(e)
                    if server.dead:
                        self._check_all_dead()
                else:
                    self.fail(ServerError(
                        f"server {server.spec.url} model {request.model}: {e}"))
                    return
            except ServerError as e:
                self.fail(e)
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug here must end the run, not hang it
                self.fail(e)
                return
            else:
                server.succeeded(request)
                try:
                    self.on_result(request, embeddings)
                except Exception as e:
                    self.fail(e)
                    return

    def recall(self, server: Server) -> int:
        """`server` left the pool and still holds requests: they go back to the queue and its
        slots stop (an answer that still comes is dropped). Returns how many were recalled."""
        recalled = 0
        for slot, (owner, request) in list(self._sending.items()):
            if owner is server:
                del self._sending[slot]
                self._again(request)
                slot.cancel()
                recalled += 1
        return recalled

    def _rejected(self, request: Request, error) -> None:
        if len(request.items) > 1:
            log.info("model %s rejected a request of %d sequences (%s); sending them one by one",
                     request.model, len(request.items), error.message())
            for single in request.split():
                self._again(single)
        else:
            self.on_reject(request, request.items[0], error.message() or str(error))

    def _check_all_dead(self) -> None:
        if self.joining():  # a server still connecting may take the work (servers.py)
            return
        if all(server.dead or server.retired for server in self.servers):
            detail = "; ".join(f"{s.spec.url}: {s.last_error}" for s in self.servers)
            self.fail(ServerUnavailableError(
                f"server unavailable: every server stayed down past --retries "
                f"({self.servers[0].config.retries}): {detail}"))

    def fail(self, error: BaseException) -> None:
        """End the run with `error` (the first one wins)."""
        if self.error is None:
            self.error = error
        self.failed.set()

    async def close(self) -> None:
        """Stop every worker (in-flight requests are cancelled; their blocks stay unfinished)."""
        self.closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
