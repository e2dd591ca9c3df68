"""Locust load test: gRPC users sending realistic mixed-length sequences to esm2 and dnabert_s.

    locust -f perf/locustfile.py --headless -u 16 -r 4 --run-time 2m --host localhost:8001 --csv out

--host is Triton's gRPC address (host:port, no scheme). Each request carries
--seqs-per-request sequences of random length (proteins 40-170 aa, DNA 120-500 bp), so
sequences sent = successful requests x --seqs-per-request. Locust's "name" is the model.
The run always ends by itself: --run-time when given, else the --stop-after timer.
Against an embed-server with TLS and an API key: --tls (or --tls-ca-file ca.crt) and
--api-key-file PATH or $EMBED_API_KEY, as embed-client takes them (the key is never shown).
"""
# Locust runs on gevent: grpc must cooperate with it before any channel exists.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import functools  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
from gevent import GreenletExit, monkey  # noqa: E402
import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from locust import User, constant_throughput, events, task  # noqa: E402
from locust.runners import WorkerRunner  # noqa: E402

from embed_client.credentials import API_KEY_FILE_ENV, read_api_key  # noqa: E402
from embed_client.transport import API_KEY_METADATA  # noqa: E402  (no grpc/tritonclient import)
from make_perf_inputs import random_sequence  # noqa: E402  (perf/ is on sys.path under locust)


@events.init_command_line_parser.add_listener
def _add_options(parser):
    parser.add_argument("--seqs-per-request", type=int, default=8, include_in_web_ui=True,
                        help="sequences in each inference request")
    parser.add_argument("--request-rate", type=float, default=4.0, include_in_web_ui=True,
                        help="requests per second per user (locust constant_throughput)")
    parser.add_argument("--esm2-weight", type=int, default=3,
                        help="relative frequency of esm2 requests (VirNucPro sends ~6 frames per chunk)")
    parser.add_argument("--dnabert-s-weight", type=int, default=1,
                        help="relative frequency of dnabert_s requests")
    parser.add_argument("--stop-after", type=float, default=600.0,
                        help="seconds after which the test quits by itself when --run-time is not given")
    parser.add_argument("--request-timeout", type=float, default=60.0,
                        help="client-side timeout of one request, seconds")
    parser.add_argument("--tls", action="store_true", help="gRPC over TLS")
    parser.add_argument("--tls-ca-file", default="",
                        help="PEM CA certificate(s) of the server's certificate; implies --tls")
    parser.add_argument("--tls-cert-file", default="",
                        help="PEM client certificate (mutual TLS), with --tls-key-file")
    parser.add_argument("--tls-key-file", default="", help="PEM key of --tls-cert-file")
    parser.add_argument("--api-key-file", default=os.environ.get(API_KEY_FILE_ENV, ""),
                        help="file holding the server's API key (else $EMBED_API_KEY)")


def _security(options):
    """(InferenceServerClient's TLS arguments, the headers of every request)."""
    ca_file = getattr(options, "tls_ca_file", "") or None
    cert = getattr(options, "tls_cert_file", "") or None
    tls = {"ssl": bool(getattr(options, "tls", False) or ca_file or cert),
           "root_certificates": ca_file, "certificate_chain": cert,
           "private_key": getattr(options, "tls_key_file", "") or None}
    key = _api_key(getattr(options, "api_key_file", ""))
    return tls, ({API_KEY_METADATA: key} if key else None)


@functools.lru_cache(maxsize=None)
def _api_key(key_file: str):
    """The key as embed-client reads it (the file, else $EMBED_API_KEY), once per process."""
    return read_api_key(Path(key_file) if key_file else None)


@events.test_start.add_listener
def _stop_timer(environment, **_kwargs):
    """Bound the run even without --run-time (e.g. from the web UI)."""
    options = environment.parsed_options
    if options is None or isinstance(environment.runner, WorkerRunner) or options.run_time:
        return
    gevent.spawn_later(options.stop_after, environment.runner.quit)


@events.quit.add_listener
def _exit_even_if_shutdown_hangs(exit_code, **_kwargs):
    """Locust has printed and saved its results when `quit` fires; the interpreter's own shutdown
    then joins leftover threads, and once (in CI) it hung there for minutes after the
    results were out (grpc's gevent integration). A real OS thread (not a greenlet: the original
    `_thread.start_new_thread`, which gevent's patched threading does not replace for us) ends the
    process 15 s later if it is still alive; a normal exit comes first and takes it along."""
    start_os_thread = monkey.get_original("_thread", "start_new_thread")
    os_sleep = monkey.get_original("time", "sleep")

    def watchdog():
        os_sleep(15)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)

    start_os_thread(watchdog, ())


class EmbeddingUser(User):
    """One tritonclient.grpc (sync, gevent-patched) client per simulated user."""

    def on_start(self):
        options = self.environment.parsed_options
        self.seqs_per_request = options.seqs_per_request
        self.timeout = options.request_timeout
        self.models = ["esm2", "dnabert_s"]
        self.weights = [options.esm2_weight, options.dnabert_s_weight]
        self._pace = constant_throughput(options.request_rate)
        self.rng = random.Random()
        tls, self.headers = _security(options)
        self.client = grpcclient.InferenceServerClient(url=self.host, **tls)

    def on_stop(self):
        self.client.close()

    def wait_time(self):
        return self._pace(self)

    @task
    def embed(self):
        model = self.rng.choices(self.models, weights=self.weights)[0]
        sequences = [random_sequence(model, self.rng) for _ in range(self.seqs_per_request)]
        self.infer(model, sequences)

    def infer(self, model: str, sequences: list[str]) -> None:
        """One request in its own greenlet, so that a stop never loses it half-way.

        Locust stops a user by killing its greenlet, and under load the kill can land during a
        request (even with --stop-timeout: a user woken from its wait at the same loop tick
        starts a new task first). The request would then reach the server but never be
        reported. Here the kill waits until the request has finished and been reported.
        """
        request = gevent.spawn(self._infer, model, sequences)
        try:
            request.join()
        except GreenletExit:
            request.join()
            raise

    def _infer(self, model: str, sequences: list[str]) -> None:
        """One gRPC request, reported to locust as request_type "grpc", name = model."""
        data = np.array([s.encode() for s in sequences], dtype=np.object_).reshape(-1, 1)
        inp = grpcclient.InferInput("SEQUENCE", list(data.shape), "BYTES")
        inp.set_data_from_numpy(data)
        start = time.perf_counter()
        exception, length = None, 0
        try:
            result = self.client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("EMBEDDING")],
                                       headers=self.headers, client_timeout=self.timeout)
            embedding = result.as_numpy("EMBEDDING")
            if embedding is None or embedding.shape[0] != len(sequences):
                got = None if embedding is None else embedding.shape
                raise RuntimeError(f"{model}: expected {len(sequences)} embeddings, got shape {got}")
            length = embedding.nbytes
        except Exception as error:  # every failure is reported to locust, never swallowed
            # InferenceServerException's repr is empty: name the type and the message
            exception = RuntimeError(f"{type(error).__name__}: {error}")
        self.environment.events.request.fire(
            request_type="grpc", name=model, response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length, exception=exception,
            context={"sequences": len(sequences), "letters": sum(map(len, sequences))},
        )
