"""The run's servers: start with the first one ready, let the others join when they are and fit.

Every server must serve the run's models with the same embedding width; the smallest
max_batch_size among them bounds every request. A server that becomes ready after the run
started joins the pull only if its widths and max_batch_size fit the others'.

A --server given as a DNS name with several addresses (a Kubernetes headless Service) is
one server per address (discovery.py: the rules); the names are resolved again every
`resolve_every` seconds while the run sends: new addresses connect and join late, addresses
no longer listed leave (their servers pull no new work; what they had in flight finishes or
goes back to the shared queue, transport.py). The run fails only when no server is left
pulling and none is connecting.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Dict, List, Optional, Sequence

from . import discovery
from .dispatcher import Dispatcher
from .errors import ServerError, ServerUnavailableError
from .progress import MetricsPoller
from .transport import Server, ServerSpec, TransportConfig

log = logging.getLogger("embed_client")

# How long a server that left may still answer what it holds: a pod taken out of its Service
# drains (tritonserver's --exit-timeout-secs, 30 s by default); one that vanished never
# answers. After that its requests in flight go back to the queue for the other servers.
LEAVE_GRACE_S = 30.0


class ServerPool:
    """The servers contacted, those pulling work, those still connecting, and the models' shapes."""

    def __init__(self, specs: Sequence[ServerSpec], transport: TransportConfig,
                 models: Sequence[str], resolve_every: float = 30.0,
                 resolver: Optional[discovery.Resolver] = None):
        self.specs = tuple(specs)
        self.transport = transport
        self.models = tuple(models)
        self.resolve_every = resolve_every             # seconds; 0: names resolved once
        self._resolver = resolver                      # None: discovery.resolve (at call time)
        self.entries = [discovery.Entry(spec) for spec in self.specs]
        self._refresher: Optional[asyncio.Task] = None
        self._recalls: List[asyncio.TimerHandle] = []
        self.contacted: List[Server] = []              # every server connect() started on
        self.joined: List[Server] = []                 # connected and pulling work
        self.connecting: Dict[asyncio.Task, Server] = {}
        self.hidden: Dict[str, int] = {}               # embedding width per model
        self.max_batch: Dict[str, int] = {}            # smallest max_batch_size per model
        self._dispatcher: Optional[Dispatcher] = None
        self._metrics: Optional[MetricsPoller] = None

    async def connect(self) -> None:
        """Start as soon as one server is ready; the others join the run when they are."""
        self.contacted = []
        for entry in self.entries:
            addresses = await self._lookup(entry) if entry.named else None
            joining, _ = entry.plan(addresses)
            for key, spec in joining:
                self._new_server(entry, key, spec)
            if entry.expanded:
                log.info("server %s: %d addresses, one server each: %s", entry.spec.url,
                         len(entry.servers), ", ".join(s.spec.url for s in entry.servers.values()))
        tasks = {asyncio.ensure_future(s.connect(self.models)): s for s in self.contacted}
        pending, errors = set(tasks), []
        while pending and not self.joined:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if error is None:
                    self.joined.append(tasks[task])
                elif isinstance(error, ServerUnavailableError):
                    log.warning("%s", error)
                    errors.append(str(error))
                else:
                    for other in pending:
                        other.cancel()
                    raise error
        if not self.joined:
            raise ServerUnavailableError("no server reachable: " + "; ".join(errors))
        self.connecting = {task: tasks[task] for task in pending}
        for model in self.models:
            widths = {s.spec.url: s.models[model].hidden for s in self.joined}
            if len(set(widths.values())) != 1:
                raise ServerError(f"model {model}: the servers disagree on the embedding width "
                                  f"{widths}")
            self.hidden[model] = next(iter(widths.values()))
            self.max_batch[model] = min(s.models[model].max_batch_size for s in self.joined)
        for server in self.joined:
            self._describe(server)
        for server in self.connecting.values():
            log.info("server %s is not ready yet; it joins the run when it is", server.spec.url)

    def feed(self, dispatcher: Dispatcher, metrics: MetricsPoller) -> None:
        """Joined servers not yet in `dispatcher` go into it (and their metrics into `metrics`);
        servers still connecting join both when they are ready."""
        self._dispatcher, self._metrics = dispatcher, metrics
        for server in self.joined:
            if server not in dispatcher.servers:
                dispatcher.add(server)
                metrics.add(server.spec.metrics_url)
        dispatcher.joining = lambda: bool(self.connecting)
        for task in list(self.connecting):
            task.add_done_callback(self._join_late)
        if (self._refresher is None and self.resolve_every > 0
                and any(entry.named for entry in self.entries)):
            self._refresher = asyncio.ensure_future(self._refresh_loop())

    def _join_late(self, task: asyncio.Task) -> None:
        """A server that was not ready at the start: add it to the pull if it fits."""
        server = self.connecting.pop(task, None)
        if server is None or task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.warning("server %s left out: %s", server.spec.url, error)
            self._check_alive()
            return
        misfit = [m for m in self.models
                  if server.models[m].hidden != self.hidden[m]
                  or server.models[m].max_batch_size < self.max_batch[m]]
        if misfit:
            log.warning("server %s left out: its %s differ in width or max_batch_size from "
                        "the other servers'", server.spec.url, ", ".join(misfit))
            self._check_alive()
            return
        if not self._dispatcher.add(server):  # the run has stopped sending
            return
        self._describe(server)
        self.joined.append(server)
        self._metrics.add(server.spec.metrics_url)

    # ------------------------------------------------------------------ names, resolved again

    def _new_server(self, entry: discovery.Entry, key: str, spec: ServerSpec) -> Server:
        server = Server(spec, self.transport)
        entry.servers[key] = server
        self.contacted.append(server)
        return server

    async def _lookup(self, entry: discovery.Entry) -> Optional[List[str]]:
        """The addresses of `entry`'s name now; None when the lookup fails (logged once)."""
        resolver = self._resolver or discovery.resolve
        try:
            addresses = await asyncio.to_thread(resolver, entry.host, entry.port)
        except (OSError, UnicodeError) as e:
            if entry.failing != str(e):
                log.warning("server %s: resolving %s failed (%s); the servers stay as they are",
                            entry.spec.url, entry.host, e)
            entry.failing = str(e)
            return None
        entry.failing = None
        return list(addresses)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resolve_every)
            try:
                await self.refresh()
            except Exception:  # a bug here must not stop the run, nor pass unseen
                log.exception("resolving the server names again failed")

    async def refresh(self) -> None:
        """Resolve every name again: new addresses connect (and join when ready), addresses
        no longer listed leave."""
        if not self.max_batch:  # not connected yet (a --resume run connects when it must)
            return
        for entry in self.entries:
            if not entry.named or self._dispatcher is None or self._dispatcher.closed:
                continue
            addresses = await self._lookup(entry)
            joining, leaving = entry.plan(addresses)
            if not joining and not leaving:
                continue
            log.info("server %s now resolves to %s: %d joining, %d leaving", entry.spec.url,
                     ", ".join(addresses or []), len(joining), len(leaving))
            for key, spec in joining:
                server = self._new_server(entry, key, spec)
                task = asyncio.ensure_future(server.connect(self.models))
                self.connecting[task] = server
                task.add_done_callback(self._join_late)
            for key in leaving:
                self._leave(entry.servers.pop(key), entry)
            self._check_alive()

    def _leave(self, server: Server, entry: discovery.Entry) -> None:
        """`server` is no longer listed for its name: it pulls no new work (transport.py)."""
        server.retired = True
        for task, connecting in list(self.connecting.items()):
            if connecting is server:
                del self.connecting[task]
                task.cancel()
        log.info("server %s left the run (no longer listed for %s); what it holds goes to "
                 "the other servers if not answered within %.0f s", server.spec.url, entry.host,
                 LEAVE_GRACE_S)
        loop = asyncio.get_running_loop()
        self._recalls.append(loop.call_later(LEAVE_GRACE_S, self._recall, server))
        url = server.spec.metrics_url
        if self._metrics is not None and not any(
                s.spec.metrics_url == url and not s.retired for s in self.joined):
            self._metrics.remove(url)

    def _recall(self, server: Server) -> None:
        dispatcher = self._dispatcher
        if dispatcher is None or dispatcher.closed:
            return
        recalled = dispatcher.recall(server)
        if recalled:
            log.warning("server %s left without answering %d requests; they go to the other "
                        "servers", server.spec.url, recalled)

    def _check_alive(self) -> None:
        """No server pulling and none connecting: the run cannot go on."""
        dispatcher = self._dispatcher
        if dispatcher is None or dispatcher.closed or self.connecting:
            return
        if any(not s.dead and not s.retired for s in dispatcher.servers):
            return
        detail = "; ".join(f"{s.spec.url}: {'left' if s.retired else s.last_error}"
                           for s in self.contacted)
        dispatcher.fail(ServerUnavailableError(f"server unavailable: no server left: {detail}"))

    @staticmethod
    def _describe(server: Server) -> None:
        log.info("server %s: %s; %d requests in flight", server.spec.url,
                 ", ".join(f"{m} (width {i.hidden}, max batch {i.max_batch_size}, "
                           f"{i.instances} instances{'' if i.dtype == 'auto' else f', dtype {i.dtype}'})"
                           for m, i in server.models.items()),
                 server.in_flight)

    async def close(self) -> None:
        """Stop resolving and connecting, and close every server contacted."""
        for handle in self._recalls:
            handle.cancel()
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None
        for task in self.connecting:
            task.cancel()
        for server in self.contacted:
            await server.close()
