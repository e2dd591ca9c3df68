"""The soak's locust user (perf/soak.py runs it): perf/locustfile.py's EmbeddingUser, both models,
with a mix of request sizes instead of one --seqs-per-request.

    locust -f perf/soak_user.py --headless -u 4 -r 4 --run-time 5m --host 127.0.0.1:8001 \
        --soak-sizes 1:3,8:4,32:2,128:1 --soak-long-fraction 0.05 --soak-tally tally.json

Each request carries N sequences, N drawn from --soak-sizes (N:weight, comma-separated); a fraction
--soak-long-fraction of requests carries long sequences (ESM-2 600-1,022 residues, DNABERT-S
1,000-4,000 bp) instead of the usual lengths (40-170 aa, 120-500 bp). Every option of
perf/locustfile.py applies (--request-rate, --esm2-weight, --request-timeout, TLS and keys).
--soak-tally PATH: at the end, what the client counted, per model (requests succeeded and failed,
sequences and letters in the succeeded ones, response times, completions per 10 s), as JSON.
"""
# perf/ is on sys.path under locust. locustfile first: it makes grpc cooperate with gevent, and
# registers its options and events (the --stop-after timer, the exit watchdog) for this file too.
import locustfile as base

import json  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

from locust import events  # noqa: E402
from locust.runners import WorkerRunner  # noqa: E402

from make_perf_inputs import random_sequence  # noqa: E402

LONG_LENGTHS = {"esm2": (600, 1022), "dnabert_s": (1000, 4000)}
TALLY_BUCKET_S = 10.0


def parse_sizes(text: str) -> tuple[list, list]:
    """"1:3,8:4,32" -> ([1, 8, 32], [3, 4, 1]): sequences per request and their weights."""
    sizes, weights = [], []
    for part in text.split(","):
        size, _, weight = part.strip().partition(":")
        sizes.append(int(size))
        weights.append(float(weight) if weight else 1.0)
    if not sizes or min(sizes) < 1 or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"--soak-sizes {text!r}: expected N:WEIGHT,... with N >= 1")
    return sizes, weights


@events.init_command_line_parser.add_listener
def _add_options(parser):
    parser.add_argument("--soak-sizes", default="1:3,8:4,32:2,128:1",
                        help="sequences per request and their weights, N:WEIGHT comma-separated")
    parser.add_argument("--soak-long-fraction", type=float, default=0.05,
                        help="fraction of requests with long sequences")
    parser.add_argument("--soak-tally", default="", help="write the client's own counts here (JSON) at the end")


class _Tally:
    """The client's counts, from locust's request events (successes and failures alike)."""

    def __init__(self):
        self.start = time.monotonic()
        self.models = defaultdict(lambda: {"succeeded": 0, "failed": 0, "sequences": 0, "letters": 0,
                                           "response_ms": [], "errors": defaultdict(int)})
        self.buckets = defaultdict(int)  # completions (any outcome) per TALLY_BUCKET_S since start

    def on_request(self, request_type, name, response_time, exception=None, context=None, **_kwargs):
        entry = self.models[name]
        context = context or {}
        if exception is None:
            entry["succeeded"] += 1
            entry["sequences"] += int(context.get("sequences", 0))
            entry["letters"] += int(context.get("letters", 0))
            entry["response_ms"].append(round(response_time, 2))
        else:
            entry["failed"] += 1
            entry["errors"][str(exception)[:200]] += 1
        self.buckets[int((time.monotonic() - self.start) // TALLY_BUCKET_S)] += 1

    def as_dict(self) -> dict:
        last = max(self.buckets, default=-1)
        return {"models": {m: {**e, "errors": dict(e["errors"])} for m, e in self.models.items()},
                "bucket_s": TALLY_BUCKET_S, "completions_per_bucket": [self.buckets.get(i, 0) for i in range(last + 1)]}


_tally = _Tally()
_tally_path = []  # --soak-tally, from the test's options
events.request.add_listener(_tally.on_request)


@events.test_start.add_listener
def _reset(environment, **_kwargs):
    _tally.start = time.monotonic()
    options = environment.parsed_options
    if options is not None and options.soak_tally and not isinstance(environment.runner, WorkerRunner):
        _tally_path[:] = [options.soak_tally]


@events.quit.add_listener
def _write_tally(exit_code, **_kwargs):
    """After locust has stopped every user (in-flight requests reported) and printed its stats."""
    if _tally_path:
        with open(_tally_path[0], "w") as out:
            json.dump({"exit_code": exit_code, **_tally.as_dict()}, out)


class SoakUser(base.EmbeddingUser):
    """EmbeddingUser with a request-size mix and an occasional request of long sequences."""

    def on_start(self):
        super().on_start()
        options = self.environment.parsed_options
        self.sizes, self.size_weights = parse_sizes(options.soak_sizes)
        self.long_fraction = options.soak_long_fraction

    def embed_mixed(self):
        model = self.rng.choices(self.models, weights=self.weights)[0]
        count = self.rng.choices(self.sizes, weights=self.size_weights)[0]
        lo, hi = LONG_LENGTHS[model] if self.rng.random() < self.long_fraction else (None, None)
        self.infer(model, [random_sequence(model, self.rng, lo, hi) for _ in range(count)])


# The only task: UserMeta would otherwise inherit EmbeddingUser's fixed-size `embed` beside it.
SoakUser.tasks = [SoakUser.embed_mixed]
