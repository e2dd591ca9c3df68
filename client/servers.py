"""The run's servers: start with the first one ready, let the others join when they are and fit.

Every server must serve the run's models with the same embedding width; the smallest
max_batch_size among them bounds every request. A server that becomes ready after the run
started joins the pull only if its widths and max_batch_size fit the others'.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Dict, List, Optional, Sequence

from .errors import ServerError, ServerUnavailableError
from .progress import MetricsPoller
from .transport import Dispatcher, Server, ServerSpec, TransportConfig

log = logging.getLogger("embed_client")


class ServerPool:
    """The servers contacted, those pulling work, those still connecting, and the models' shapes."""

    def __init__(self, specs: Sequence[ServerSpec], transport: TransportConfig,
                 models: Sequence[str]):
        self.specs = tuple(specs)
        self.transport = transport
        self.models = tuple(models)
        self.contacted: List[Server] = []              # every server connect() started on
        self.joined: List[Server] = []                 # connected and pulling work
        self.connecting: Dict[asyncio.Task, Server] = {}
        self.hidden: Dict[str, int] = {}               # embedding width per model
        self.max_batch: Dict[str, int] = {}            # smallest max_batch_size per model
        self._dispatcher: Optional[Dispatcher] = None
        self._metrics: Optional[MetricsPoller] = None

    async def connect(self) -> None:
        """Start as soon as one server is ready; the others join the run when they are."""
        self.contacted = [Server(spec, self.transport) for spec in self.specs]
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
        for task in list(self.connecting):
            task.add_done_callback(self._join_late)

    def _join_late(self, task: asyncio.Task) -> None:
        """A server that was not ready at the start: add it to the pull if it fits."""
        server = self.connecting.pop(task, None)
        if server is None or task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.warning("server %s left out: %s", server.spec.url, error)
            return
        misfit = [m for m in self.models
                  if server.models[m].hidden != self.hidden[m]
                  or server.models[m].max_batch_size < self.max_batch[m]]
        if misfit:
            log.warning("server %s left out: its %s differ in width or max_batch_size from "
                        "the other servers'", server.spec.url, ", ".join(misfit))
            return
        if not self._dispatcher.add(server):  # the run has stopped sending
            return
        self._describe(server)
        self.joined.append(server)
        self._metrics.add(server.spec.metrics_url)

    @staticmethod
    def _describe(server: Server) -> None:
        log.info("server %s: %s; %d requests in flight", server.spec.url,
                 ", ".join(f"{m} (width {i.hidden}, max batch {i.max_batch_size}, "
                           f"{i.instances} instances)" for m, i in server.models.items()),
                 server.in_flight)

    async def close(self) -> None:
        """Stop connecting and close every server contacted."""
        for task in self.connecting:
            task.cancel()
        for server in self.contacted:
            await server.close()
