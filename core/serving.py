"""Triton-free serving helpers shared by the two model.py files.

model.py only converts between Triton objects and plain Python/numpy; everything else
(config parameters, device placement, input decoding, one core call for all requests,
errors per request, metric increments) lives here, where tests can import it without
Triton.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from .alphabets import FP8_GATE_METRIC  # noqa: F401  (a GAUGE, labels METRIC_LABELS + plan; shared with the client)
from .errors import EmbedCoreError, InvalidSequenceError, SequenceTooLargeError
from .representations import INCLUDE_CHOICES, representation_layer

# Custom metrics (Prometheus COUNTERs) and the field each one follows: an EmbedStats field
# (the core's counts) or a PhaseSeconds field (wall time per phase of execute, kept here).
METRICS = {
    "embed_sequences_total": ("sequences", "Sequences embedded"),
    "embed_tokens_total": ("tokens", "Tokens (specials included) run through the encoder"),
    "embed_forward_passes_total": ("forward_passes", "Encoder forward passes"),
    "embed_failures_total": ("failures", "Sequences rejected (bad input) or too large for the device"),
    "embed_cancelled_total": ("cancelled", "Sequences not computed because their request was cancelled"),
    "embed_prep_seconds_total": (
        "prep_seconds", "Wall seconds in execute decoding request tensors and tokenizing"),
    "embed_compute_seconds_total": (
        "compute_seconds", "Wall seconds in the encoder call (packing, forwards, pooling, copy to host)"),
}
METRIC_LABELS = ("model", "gpu", "instance")


@dataclasses.dataclass
class PhaseSeconds:
    """Cumulative wall seconds one model instance spent per phase of its work.

    Triton's compute_infer time is the execute call; this splits the work, so a slow instance
    shows whether the host work around the encoder or the encoder call itself is the cost.
    The Triton models answer from a second thread (model.py's execute returns once the forwards
    are queued), so compute's wait for the device lies partly outside Triton's execute time.
    `add` takes the lock: the execute thread and the answering thread both add time.
    """

    prep_seconds: float = 0.0      # decoding the SEQUENCE tensors + tokenizing
    compute_seconds: float = 0.0   # the encoder call: queuing the forwards, then waiting for the
                                   # rows on the host (device time plus host work it did not hide)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            setattr(self, phase, getattr(self, phase) + seconds)

    def as_dict(self) -> dict:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "_lock"}


# Tokens one request may hold (config parameter max_request_tokens): one request must not hold an
# instance for long. 1M tokens is ~10 s of ESM-2 3B on an H200; our client sends far smaller ones.
DEFAULT_MAX_REQUEST_TOKENS = 1 << 20


class RequestError(EmbedCoreError):
    """One request is malformed as a whole (missing input, undecodable bytes, over the token cap)."""


class RequestCancelled(EmbedCoreError):
    """The request's client has gone (deadline, cancel, disconnect): its rows were not sent."""


def max_request_tokens(params: dict) -> int:
    """The max_request_tokens parameter (a positive int, or auto = DEFAULT_MAX_REQUEST_TOKENS)."""
    value = _number(params, "max_request_tokens", auto=DEFAULT_MAX_REQUEST_TOKENS)
    if value < 1:
        raise ValueError(f"parameter max_request_tokens must be positive, got {value}")
    return value


def numpy_problem() -> Optional[str]:
    """Why this numpy cannot serve under the tritonserver 2.51 Python backend, or None."""
    if int(np.__version__.split(".")[0]) >= 2:
        return (
            f"numpy {np.__version__} is installed for the Python backend stub; tritonserver 2.51's "
            "Python backend needs numpy<2 (under numpy 2 its outputs arrive empty and string "
            "inputs crash the stub). Install 'numpy<2' into the environment whose python3 is "
            "first on tritonserver's PATH."
        )
    return None


def config_parameters(model_config: dict) -> dict:
    """The `parameters` of a model config (as Triton's JSON) as {key: string_value}."""
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def _number(params: dict, key: str, convert=int, auto=None):
    """A numeric config parameter: `convert` of its value, or `auto` where it is absent, empty or auto."""
    value = params.get(key, "auto").strip()
    if value in ("", "auto"):
        return auto
    try:
        return convert(value)
    except ValueError:
        kind = "an integer" if convert is int else "a number"
        raise ValueError(f"parameter {key} must be 'auto' or {kind}, got {value!r}") from None


def runtime_options(params: dict, device: str):
    """RuntimeConfig from the config parameters dtype (auto | float32 | bfloat16 | float16 | fp8 |
    fp8-smooth | fp8-ffn | fp8-auto), token_budget, max_length, too_long, attention, kernels,
    fp8_min_cosine (absent ones keep RuntimeConfig's defaults)."""
    from .fp8 import DEFAULT_MIN_COSINE
    from .runtime import RuntimeConfig

    def name(key: str, default: str) -> str:
        return params.get(key, default).strip() or default

    return RuntimeConfig(
        device=device,
        dtype=name("dtype", "auto"),
        token_budget=_number(params, "token_budget"),
        max_length=_number(params, "max_length"),
        too_long=name("too_long", "error"),
        attention=name("attention", "auto"),
        kernels=name("kernels", "auto"),
        fp8_min_cosine=_number(params, "fp8_min_cosine", float, DEFAULT_MIN_COSINE),
    )


def checkpoint_path(params: dict, model_dir: Union[str, Path]) -> Path:
    """The `checkpoint` parameter; a relative path resolves against the model folder."""
    path = Path(os.path.expandvars(params.get("checkpoint", "").strip() or "checkpoint"))
    path = path if path.is_absolute() else Path(model_dir) / path
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist (config parameter 'checkpoint'; "
            "build the repository with embed-export, or point the parameter at a checkpoint)"
        )
    return path


def place_instance(kind: str, device_id: str, model_config: dict) -> tuple:
    """(torch device name, metric label) for a Triton instance, pinned before any CUDA work.

    The Python backend does not set CUDA_VISIBLE_DEVICES: a GPU instance must select
    `cuda:<device id>` itself before anything creates a CUDA context (else every stub
    puts one on GPU 0). CPU instances share the cores evenly.
    """
    import torch

    if kind == "GPU":
        device = f"cuda:{int(device_id)}"
        torch.cuda.set_device(torch.device(device))
        return device, str(int(device_id))
    cpu_instances = sum(
        int(g.get("count", 1)) for g in model_config.get("instance_group", []) if g.get("kind") == "KIND_CPU"
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, cpu_instances)))
    return "cpu", "cpu"


def embedding_dims_problem(model_config: dict, output_name: str, hidden: int) -> Optional[str]:
    """A mismatch between the output's configured dims and the checkpoint, or None.

    `dims: [ -1 ]` accepts any hidden size; a fixed value must equal the checkpoint's.
    """
    for output in model_config.get("output", []):
        if output.get("name") == output_name:
            dims = [int(d) for d in output.get("dims", [])]
            if dims != [-1] and dims != [hidden]:
                return f"output {output_name} has dims {dims} but the checkpoint's hidden size is {hidden}"
    return None


def decode_sequences(array: Optional[np.ndarray]) -> Union[list, RequestError]:
    """One request's SEQUENCE tensor ([n, 1] or [n] BYTES) -> n strings, or the request's error."""
    if array is None:
        return RequestError("the request has no input tensor named SEQUENCE")
    flat = array.reshape(-1)
    if array.ndim == 0 or (array.ndim > 1 and array.shape[1:] != (1,) * (array.ndim - 1)):
        return RequestError(f"input SEQUENCE must have shape [n, 1], got {list(array.shape)}")
    sequences = []
    for i, item in enumerate(flat):
        if isinstance(item, (bytes, np.bytes_)):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError as err:
                return RequestError(f"sequence {i}: not UTF-8 text ({err.reason} at byte {err.start})")
        elif not isinstance(item, str):
            return RequestError(f"sequence {i}: expected a string, got {type(item).__name__}")
        sequences.append(item)
    return sequences


@dataclasses.dataclass(frozen=True)
class RequestOptions:
    """What one request asks for (its KServe parameters "layer" and "include"; representations.py)."""

    layer: Optional[int] = None            # None = the last layer
    include: Tuple[str, ...] = ("mean",)   # the mean always; "bos", "per_token" on request


def request_options(parameters: Union[str, dict, None], num_layers: int) -> Union[RequestOptions, RequestError]:
    """A request's parameters (Triton hands them over as JSON) as RequestOptions, or its error."""
    try:
        params = json.loads(parameters or "{}") if isinstance(parameters, str) else dict(parameters or {})
    except ValueError:
        return RequestError("the request's parameters are not valid JSON")
    include = {s.strip() for s in str(params.get("include", "mean")).split(",") if s.strip()} | {"mean"}
    unknown = include - set(INCLUDE_CHOICES)
    if unknown:
        return RequestError(f"parameter include: {', '.join(sorted(unknown))} is not one of {', '.join(INCLUDE_CHOICES)}")
    layer = params.get("layer")
    if layer is not None:
        if isinstance(layer, bool) or not re.fullmatch(r"-?\d+", str(layer).strip()):
            return RequestError(f"parameter layer: {layer!r} is not an integer")
        layer = int(layer)
        try:
            representation_layer(layer, num_layers)
        except ValueError as err:
            return RequestError(f"parameter layer: {err}")
    return RequestOptions(layer, tuple(name for name in INCLUDE_CHOICES if name in include))


def pad_token_rows(tokens: list, dtype) -> Tuple[np.ndarray, np.ndarray]:
    """Per-token rows of n sequences as one [n, longest, H] array (zeros past each sequence's rows)
    and their counts [n, 1] int32: the TOKEN_EMBEDDINGS and TOKEN_COUNT outputs."""
    counts = np.array([[len(t)] for t in tokens], dtype=np.int32)
    hidden = tokens[0].shape[1] if tokens else 0
    padded = np.zeros((len(tokens), int(counts.max(initial=0)), hidden), dtype=dtype)
    for i, rows in enumerate(tokens):
        padded[i, :len(rows)] = rows
    return padded, counts


class Embeddings(NamedTuple):
    """One request's answer: the means [n, H], and where asked the first tokens' rows [n, H] and
    each sequence's per-token rows [len_i, H]."""

    mean: np.ndarray
    bos: Optional[np.ndarray] = None
    tokens: Optional[list] = None


@dataclasses.dataclass
class _Group:
    """The requests of one execute that share a representation layer: one core call."""

    layer: Optional[int]
    include: set = dataclasses.field(default_factory=set)
    tokens: list = dataclasses.field(default_factory=list)     # token ids, requests back to back
    owners: list = dataclasses.field(default_factory=list)     # (request index, first row, row count)
    failures: dict = dataclasses.field(default_factory=dict)   # row -> SequenceTooLargeError
    launched: object = None                                    # runtime.Launched


def launch_requests(embedder, requests: Sequence[Union[list, Exception]],
                    phases: Optional[PhaseSeconds] = None, max_tokens: Optional[int] = None,
                    cancelled: Optional[Sequence[Callable[[], bool]]] = None,
                    options: Optional[Sequence[RequestOptions]] = None) -> "LaunchedRequests":
    """Each request tokenized and every forward queued, one core call per representation layer
    asked; `.finish()` waits for the rows and returns each request's Embeddings or its error (the
    Triton models finish on a second thread, so the next execute's host work overlaps this one's
    forwards).

    A request whose input is already an error, or that holds any invalid sequence, gets that
    error and the others still succeed. A sequence too large for the device even alone fails
    only its own request. `phases`, when given, gets the seconds spent tokenizing (prep) and in
    the encoder (compute) added. A request over `max_tokens` tokens gets a RequestError naming the
    cap. `cancelled[k]()` says whether request k's client has gone: such a request is not
    tokenized, its forwards are skipped where they hold nobody else's rows (asked between
    forwards), and it is answered RequestCancelled. `options[k]` says what request k asks for.
    """
    phases = phases if phases is not None else PhaseSeconds()
    options = list(options) if options is not None else [RequestOptions()] * len(requests)
    watch = _CancelWatch(cancelled, len(requests))
    results: list = list(requests)
    groups: dict = {}
    started = time.perf_counter()
    for k, sequences in enumerate(requests):
        if isinstance(sequences, Exception):  # a malformed request: bad input, counted as such
            embedder.stats.failures += 1
            continue
        if watch.is_gone(k):
            results[k] = RequestCancelled("cancelled before it was computed")
            continue
        try:
            ids = embedder.tokenize(sequences)
        except InvalidSequenceError as err:
            results[k] = err
            continue
        total = sum(len(t) for t in ids)
        if max_tokens is not None and total > max_tokens:
            embedder.stats.failures += len(ids)
            results[k] = RequestError(f"{len(ids)} sequences of {total} tokens in one request, over the "
                                      f"server's max_request_tokens {max_tokens}: send them in smaller requests")
            continue
        group = groups.setdefault(options[k].layer, _Group(options[k].layer))
        group.include.update(options[k].include)
        group.owners.append((k, len(group.tokens), len(ids)))
        group.tokens.extend(ids)
    tokenized = time.perf_counter()
    phases.add("prep_seconds", tokenized - started)
    try:
        for group in groups.values():
            group.launched = embedder.launch_tokens(
                group.tokens, failures=group.failures, gone=watch.rows_gone(group.owners, len(group.tokens)),
                layer=group.layer, include=tuple(name for name in INCLUDE_CHOICES if name in group.include))
    finally:  # a failed call still took the instance's time
        phases.add("compute_seconds", time.perf_counter() - tokenized)
    return LaunchedRequests(results, list(groups.values()), options, phases, watch)


class _CancelWatch:
    """Which requests of one execute were cancelled (asked again each time; once gone, always gone)."""

    def __init__(self, cancelled: Optional[Sequence[Callable[[], bool]]], n: int):
        self._ask = list(cancelled) if cancelled is not None else None
        self._gone = np.zeros(n, dtype=bool)

    def is_gone(self, k: int) -> bool:
        if self._ask is not None and not self._gone[k] and self._ask[k]():
            self._gone[k] = True
        return bool(self._gone[k])

    def known_gone(self, k: int) -> bool:
        """What is known already, without asking Triton (each question is a round trip to it)."""
        return bool(self._gone[k])

    def rows_gone(self, owners: list, n_rows: int) -> Optional[Callable[[], np.ndarray]]:
        """For Embedder.launch_tokens: a bool [rows] of the rows whose request has gone. Asked before
        each forward; the first time answers from what tokenizing just asked."""
        if self._ask is None:
            return None
        asked = [False]

        def gone() -> np.ndarray:
            rows = np.zeros(n_rows, dtype=bool)
            for k, start, n in owners:
                rows[start:start + n] = self.is_gone(k) if asked[0] else self.known_gone(k)
            asked[0] = True
            return rows
        return gone


@dataclasses.dataclass
class LaunchedRequests:
    """The requests of one execute with their forwards queued (launch_requests)."""

    results: list            # per request: its error, or (until finish) its sequences
    groups: list             # _Group per representation layer asked
    options: list            # RequestOptions per request
    phases: PhaseSeconds
    watch: _CancelWatch

    def finish(self) -> list:
        """Each request's Embeddings or error, once the device has them (compute counts the wait)."""
        waited = time.perf_counter()
        try:
            outputs = [group.launched.outputs() for group in self.groups]
        finally:
            self.phases.add("compute_seconds", time.perf_counter() - waited)
        results = list(self.results)
        for group, rows in zip(self.groups, outputs):
            for k, start, n in group.owners:
                bad = sorted(i for i in group.failures if start <= i < start + n)
                if self.watch.known_gone(k):   # Triton drops answers to a gone client anyway: no new question
                    results[k] = RequestCancelled("cancelled while it was computed")
                elif bad:
                    results[k] = SequenceTooLargeError(
                        f"sequence {bad[0] - start}: {len(group.tokens[bad[0]])} tokens do not fit on the device "
                        "even alone; shorten it or lower max_length")
                else:
                    results[k] = self._embeddings(rows, group.launched.token_offsets, start, n, self.options[k])
        return results

    @staticmethod
    def _embeddings(rows: dict, offsets, start: int, n: int, options: RequestOptions) -> Embeddings:
        tokens = None
        if "per_token" in options.include:
            tokens = [rows["per_token"][offsets[i]:offsets[i + 1]] for i in range(start, start + n)]
        bos = rows["bos"][start:start + n] if "bos" in options.include else None
        return Embeddings(rows["mean"][start:start + n], bos, tokens)


def is_client_error(err: BaseException) -> bool:
    """True when the request, not the server, is at fault (Triton INVALID_ARG)."""
    return isinstance(err, (InvalidSequenceError, SequenceTooLargeError, RequestError))


@dataclasses.dataclass
class MetricDeltas:
    """Turns cumulative counts (EmbedStats, PhaseSeconds) into increments for Prometheus counters."""

    last: dict = dataclasses.field(default_factory=dict)

    def take(self, *sources) -> dict:
        """{metric name: increment since the previous call} (only positive increments).

        `sources` are objects with `as_dict()` (the Embedder's stats, the PhaseSeconds);
        each METRICS field is read from whichever of them has it. Pass the same sources on
        every call: a field absent from one call would be counted again in full on the next.
        """
        now = {}
        for source in sources:
            now.update(source.as_dict())
        out = {}
        for name, (field, _) in METRICS.items():
            delta = now.get(field, 0) - self.last.get(field, 0)
            if delta > 0:
                out[name] = delta
        self.last = now
        return out
