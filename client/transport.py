"""gRPC transport to one or more Triton servers: where each listens (`ServerSpec`), how calls
are made (`TransportConfig`), and one server's calls, answers and backoff (`Server`).

A `Server` connects (backing off while it is not ready), reads its models' configs
(model_info.py), and sends one request at a time per worker slot: the shared queue and the
slots are dispatcher.py's `Dispatcher`. Faults (faults.py):
- UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED / a broken connection: the request
  goes back to the front of the queue (any server may take it) and the server cools down
  for an exponential backoff. A server whose failures outlast `retries` backoffs is given
  up; when every server is given up the run fails with `ServerUnavailableError`.
- INVALID_ARGUMENT (the server names a bad sequence): a multi-sequence request is split into
  single sequences and re-queued; a single rejected sequence is reported by id, never retried.
- Anything else (a model that fails, a wrong answer shape) ends the run (`ServerError`).

Security (embed-server's TLS and API key, docs/deploy.md "Safety"): `TransportConfig.tls` and
its files (credentials.open_client); `api_key` goes with every call as the gRPC metadata
embed-server expects, never shown (not in repr, logs or files).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence
from urllib.parse import urlsplit

import numpy as np

from .credentials import open_client
# Dispatcher (the shared queue) and the fault rules are imported from here too, as before.
from .dispatcher import Dispatcher, RejectCallback, ResultCallback  # noqa: F401
from .errors import ServerError, ServerUnavailableError
from .faults import (CONNECTION_MARKERS, REJECTED, RETRIABLE, is_rejection,  # noqa: F401
                     is_retriable)
from .model_info import ModelInfo
from .schedule import Item, Request

log = logging.getLogger(__name__)

# Valid in both alphabets (nucleotides and residues): asks a model with dims [-1] its width.
PROBE_SEQUENCE = "ACGT"
DEFAULT_GRPC_PORT = 8001
# embed-server's inference key: `x-api-key`, sent over gRPC with the prefix Triton 2.51 gives a
# restricted protocol's header (server/frontend.py: GRPC_HEADER_PREFIX + API_KEY_HEADER).
API_KEY_METADATA = "triton-grpc-protocol-x-api-key"


@dataclass(frozen=True)
class ServerSpec:
    """Where one Triton server listens: gRPC `host:port` and its Prometheus metrics URL."""

    url: str
    metrics_url: str
    # The DNS name `url`'s address was found for (discovery.py): over TLS the certificate is
    # checked against this name, as when connecting by the name.
    tls_name: Optional[str] = None

    @classmethod
    def parse(cls, url: str, metrics_url: Optional[str] = None) -> "ServerSpec":
        """`host[:port]` (gRPC, default 8001); metrics default http://host:<port + 1>/metrics."""
        text = url.strip()
        if "://" in text:
            text = text.split("://", 1)[1]
        text = text.rstrip("/")
        parts = urlsplit("//" + text)
        if not parts.hostname or parts.path:
            raise ValueError(f"server {url!r} is not host[:port]")
        try:
            port = parts.port or DEFAULT_GRPC_PORT
        except ValueError as e:
            raise ValueError(f"server {url!r}: bad port") from e
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        if metrics_url is None:
            metrics_url = f"http://{shown}:{port + 1}/metrics"  # embed-server's 8001 -> 8002
        elif "://" not in metrics_url:
            metrics_url = "http://" + metrics_url
        if urlsplit(metrics_url).path in ("", "/"):
            metrics_url = metrics_url.rstrip("/") + "/metrics"
        return cls(f"{shown}:{port}", metrics_url)


@dataclass(frozen=True)
class TransportConfig:
    """Flow control and fault handling of the transport."""

    max_in_flight: Optional[int] = None  # requests per server; None = 8 per model instance, >= 8
    retries: int = 10                   # backoffs a server may stay down before it is given up
    timeout: float = 600.0              # seconds per request
    backoff: float = 0.5                # first backoff, seconds; doubles up to backoff_max
    backoff_max: float = 30.0
    tls: bool = False                   # gRPC over TLS
    tls_ca_file: Optional[Path] = None  # PEM CA certificate(s) to trust; None: the system's
    tls_cert_file: Optional[Path] = None  # client certificate and key (mutual TLS)
    tls_key_file: Optional[Path] = None
    api_key: Optional[str] = field(default=None, repr=False)  # never shown

    @property
    def headers(self) -> Optional[Dict[str, str]]:
        """The gRPC metadata of every call: the API key, if any."""
        return {API_KEY_METADATA: self.api_key} if self.api_key else None

    def __post_init__(self):
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout}")

    def delay(self, failures: int) -> float:
        return min(self.backoff_max, self.backoff * 2 ** max(0, failures - 1))


@dataclass
class ServerStats:
    """What one server did in this run."""

    requests: Dict[str, int] = field(default_factory=dict)
    sequences: Dict[str, int] = field(default_factory=dict)
    retries: int = 0
    given_up: Optional[str] = None


class Server:
    """One Triton server: its aio client, its models' configs, its backoff state."""

    def __init__(self, spec: ServerSpec, config: TransportConfig):
        self.spec = spec
        self.config = config
        self.client = None
        self.models: Dict[str, ModelInfo] = {}
        self.stats = ServerStats()
        self.failures = 0            # consecutive backoff rounds
        self.available_at = 0.0      # monotonic time the cooldown ends
        self.last_error = ""
        self.dead = False
        self.retired = False         # left the pool (its name no longer lists it): no new work

    async def connect(self, models: Sequence[str]) -> None:
        """Wait for the server (backing off up to `retries` times) and read the model configs."""
        from tritonclient.utils import InferenceServerException

        config = self.config
        self.client = open_client(self.spec.url, config, self.spec.tls_name)
        for attempt in range(self.config.retries + 1):
            try:
                ready = await self.client.is_server_ready(headers=config.headers,
                                                          client_timeout=10)
                if ready:
                    break
                self.last_error = "server is not ready"
            except InferenceServerException as e:
                self.last_error = str(e)
            if attempt < self.config.retries:
                delay = self.config.delay(attempt + 1)
                log.info("server %s not ready (%s); retrying in %.1fs",
                         self.spec.url, self.last_error, delay)
                await asyncio.sleep(delay)
        else:
            raise ServerUnavailableError(
                f"server {self.spec.url} is unavailable after {self.config.retries} retries: "
                f"{self.last_error}")
        for name in models:
            try:
                answer = await self.client.get_model_config(name, as_json=True,
                                                            headers=config.headers,
                                                            client_timeout=30)
            except InferenceServerException as e:
                raise ServerError(f"server {self.spec.url}: model {name!r}: {e}") from e
            info = ModelInfo.from_config(name, answer.get("config", answer))
            self.models[name] = info
            if info.hidden is None:  # dims [-1]: one tiny request tells the width
                probe = Request(name, -1, [Item(-1, "probe", PROBE_SEQUENCE)])
                try:
                    width = (await self.embed(probe)).shape[1]
                except InferenceServerException as e:
                    if is_retriable(e):
                        raise ServerUnavailableError(f"server {self.spec.url}: {e}") from e
                    raise ServerError(f"server {self.spec.url}: model {name!r}: {e}") from e
                self.models[name] = dataclasses.replace(info, hidden=int(width))

    @property
    def in_flight(self) -> int:
        if self.config.max_in_flight is not None:
            return self.config.max_in_flight
        # 8 per instance: each GPU's queue stays non-empty while responses travel (perf/RESULTS.md).
        return max(8, 8 * sum(info.instances for info in self.models.values()))

    async def embed(self, request: Request, ask=None):
        """Send one request; the [n, hidden] float32 embeddings in the request's item order, or
        with `ask` (representations.Ask: layer, bos, per-token rows) its Answer."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        info = self.models[request.model]
        data = np.array([item.text.encode() for item in request.items],
                        dtype=np.object_).reshape(-1, 1)
        inputs = grpcclient.InferInput(info.input_name, list(data.shape), "BYTES")
        inputs.set_data_from_numpy(data)
        names = [info.output_name] + (list(ask.extra_outputs) if ask is not None else [])
        outputs = [grpcclient.InferRequestedOutput(name) for name in names]
        try:
            result = await self.client.infer(request.model, [inputs], outputs=outputs,
                                             headers=self.config.headers,
                                             client_timeout=self.config.timeout,
                                             parameters=None if ask is None else ask.parameters)
        except InferenceServerException as e:
            if "restricted" in (e.message() or ""):  # embed-server wants another API key
                raise ServerError(
                    f"server {self.spec.url} refused inference: "
                    + ("the API key was not accepted" if self.config.api_key else
                       "it needs an API key (--api-key-file or $EMBED_API_KEY)")) from None
            raise
        embeddings = result.as_numpy(info.output_name)
        n = len(request.items)
        if (embeddings is None or embeddings.ndim != 2 or embeddings.shape[0] != n
                or (info.hidden is not None and embeddings.shape[1] != info.hidden)):
            got = None if embeddings is None else embeddings.shape
            raise ServerError(f"server {self.spec.url} model {request.model}: answered shape "
                              f"{got} for {n} sequences (expected ({n}, {info.hidden}))")
        embeddings = embeddings.astype(np.float32, copy=False)
        return embeddings if ask is None else ask.answer(result, embeddings, self.spec.url)

    def failed(self, error: Exception) -> None:
        """Count a retriable failure; a new backoff round starts only after the last one ended."""
        self.last_error = str(error)
        self.stats.retries += 1
        now = time.monotonic()
        if now < self.available_at or self.dead:
            return
        self.failures += 1
        if self.failures > self.config.retries:  # said once: its other requests then fail quietly
            self.dead, self.stats.given_up = True, self.last_error
            log.error("server %s given up after %d retries (%d failed requests, put back in the "
                      "queue): %s", self.spec.url, self.config.retries, self.stats.retries,
                      self.last_error)
            return
        delay = self.config.delay(self.failures)
        self.available_at = now + delay
        log.warning("server %s: %s; backing off %.1fs (retry %d of %d)",
                    self.spec.url, self.last_error, delay, self.failures, self.config.retries)

    def succeeded(self, request: Request) -> None:
        self.failures = 0
        stats = self.stats
        stats.requests[request.model] = stats.requests.get(request.model, 0) + 1
        stats.sequences[request.model] = stats.sequences.get(request.model, 0) + len(request.items)

    async def close(self) -> None:
        if self.client is not None:
            try:
                await self.client.close()
            except Exception:  # closing a channel to a dead server must not mask the real error
                log.debug("closing %s failed", self.spec.url, exc_info=True)

