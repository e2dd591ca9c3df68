"""gRPC transport to one or more Triton servers: bounded in-flight requests, pull-based.

Every server gets `max_in_flight` worker slots; each slot pulls the next request from one
shared queue, sends it (`tritonclient.grpc.aio`), and hands the embeddings to a callback.
A slower or busier server answers later, so its slots pull less: the load spreads by itself.

Faults:
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
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

import numpy as np

from .credentials import open_client
from .errors import ServerError, ServerUnavailableError
from .schedule import Item, Request

log = logging.getLogger(__name__)

RETRIABLE = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED",
             "StatusCode.RESOURCE_EXHAUSTED"}
REJECTED = {"StatusCode.INVALID_ARGUMENT"}
# Transport failures that gRPC sometimes reports as INTERNAL/UNKNOWN/CANCELLED when the peer dies.
CONNECTION_MARKERS = ("socket closed", "connection reset", "stream removed", "rst_stream",
                      "broken pipe", "failed to connect", "connection refused", "goaway",
                      "end of tcp stream", "connection aborted")
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
class ModelInfo:
    """What the client needs from a model's config: names, batch bound, output width."""

    name: str
    max_batch_size: int
    hidden: Optional[int]  # None when the config says dims [-1]: learnt from a probe
    input_name: str
    output_name: str
    instances: int
    max_length: Optional[int] = None  # config parameter max_length (letters); None: "auto"
    outputs: Tuple[str, ...] = ()     # every output the model has (BOS, TOKEN_EMBEDDINGS, ...)

    @classmethod
    def from_config(cls, name: str, config: dict) -> "ModelInfo":
        """Read a `get_model_config(as_json=True)["config"]` dict (int64 fields are strings)."""
        inputs = [i for i in config.get("input", []) if i.get("data_type") == "TYPE_STRING"]
        outputs = [o for o in config.get("output", []) if o.get("data_type") == "TYPE_FP32"]
        if any(o.get("name") == "EMBEDDING" for o in outputs):  # the mean beside BOS, per-token
            outputs = [o for o in outputs if o.get("name") == "EMBEDDING"]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ServerError(
                f"model {name!r}: expected one TYPE_STRING input and one TYPE_FP32 output, "
                f"config has inputs {config.get('input')} and outputs {config.get('output')}")
        dims = [int(d) for d in outputs[0].get("dims", [])]
        if len(dims) != 1 or dims[0] == 0 or dims[0] < -1:
            raise ServerError(f"model {name!r}: output dims {dims}, expected [hidden]")
        max_batch = int(config.get("max_batch_size", 0))
        if max_batch < 1:
            raise ServerError(f"model {name!r}: max_batch_size {max_batch}, expected > 0")
        instances = 0
        for group in config.get("instance_group", []):
            count = int(group.get("count", 1))
            instances += count * max(1, len(group.get("gpus", [])))
        length = config.get("parameters", {}).get("max_length", {}).get("string_value", "")
        return cls(name, max_batch, dims[0] if dims[0] > 0 else None, inputs[0]["name"],
                   outputs[0]["name"], max(1, instances),
                   int(length) if length.strip().isdigit() else None,
                   tuple(o.get("name", "") for o in config.get("output", [])))


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


def is_retriable(error: Exception) -> bool:
    status = getattr(error, "status", lambda: None)()
    if status in RETRIABLE:
        return True
    text = str(error).lower()
    return any(marker in text for marker in CONNECTION_MARKERS)


def is_rejection(error: Exception) -> bool:
    return getattr(error, "status", lambda: None)() in REJECTED


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
