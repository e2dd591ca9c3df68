"""One --server name that stands for several servers (a Kubernetes headless Service).

Without a server: the rules of discovery.py (IP literal, one address, several, a failed
lookup), the pool's re-resolution (joins, leaves) and the transport's handling of a server
that leaves (its waiting slots hand their request back; the run fails only when no server
is left and none is connecting).

Against real servers: two tritonservers of this module's own on 127.0.0.2 and 127.0.0.3
(same ports, one per address, as pods behind a headless Service), and `discovery.resolve`
pointed at them for the name `pods.test`:
- one name, two servers: both take requests (the client's counts and the servers' own
  /metrics) and the output is complete;
- a run that starts on one live address and one where nothing listens, sees the second
  server appear (it joins), then that server killed (SIGKILL) with requests in flight and
  its address gone (it leaves): complete, with the same rows as the clean run, 0 lost.
Nothing leaves 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from embed_client import cli, discovery, servers
from embed_client.errors import ServerUnavailableError
from embed_client.progress import MetricsPoller
from embed_client.schedule import Item, Request
from embed_client.servers import ServerPool
from embed_client.transport import Dispatcher, ModelInfo, Server, ServerSpec, TransportConfig

from test_end_to_end import expected_frames, read_model_table, write_sample

NAME = "pods.test"
MODELS = ("esm2", "dnabert_s")


# ---------------------------------------------------------------- the rules, no server


def test_resolve_keeps_one_family_without_repeats(monkeypatch):
    def fake(host, port, type=0):
        return [(socket.AF_INET6, 1, 6, "", ("fd00::1", port, 0, 0)),
                (socket.AF_INET, 1, 6, "", ("10.0.0.2", port)),
                (socket.AF_INET, 1, 6, "", ("10.0.0.1", port)),
                (socket.AF_INET, 1, 6, "", ("10.0.0.2", port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    assert discovery.resolve("svc", 8001) == ["10.0.0.2", "10.0.0.1"]
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, type=0: [
        (socket.AF_INET6, 1, 6, "", ("fd00::1", port, 0, 0)),
        (socket.AF_INET6, 1, 6, "", ("fe80::2%eth0", port, 0, 2))])
    assert discovery.resolve("svc", 8001) == ["fd00::1", "fe80::2"]


def test_an_address_replaces_the_name_in_the_grpc_and_metrics_urls():
    spec = ServerSpec.parse(f"{NAME}:9001", f"http://{NAME}:9002/metrics")
    assert discovery.address_spec(spec, "10.1.2.3") == ServerSpec(
        "10.1.2.3:9001", "http://10.1.2.3:9002/metrics", tls_name=NAME)
    assert discovery.address_spec(spec, "fd00::3") == ServerSpec(
        "[fd00::3]:9001", "http://[fd00::3]:9002/metrics", tls_name=NAME)
    elsewhere = ServerSpec.parse(f"{NAME}:9001", "http://prometheus.test:9090/x")
    assert discovery.address_spec(elsewhere, "10.1.2.3").metrics_url == \
        "http://prometheus.test:9090/x"


def _stub_connect(monkeypatch, hidden=8, max_batch=64):
    """Server.connect without a server: every model answers with the same config."""
    async def connect(self, models):
        if self.spec.url.startswith("10.9."):  # nothing listens there
            raise ServerUnavailableError(f"server {self.spec.url} is unavailable")
        self.models = {m: ModelInfo(m, max_batch, hidden, "SEQUENCE", "EMBEDDING", 1)
                       for m in models}

    monkeypatch.setattr(Server, "connect", connect)


class Answers:
    """A resolver whose answers the test changes; records the names it was asked."""

    def __init__(self, **names):
        self.names = names
        self.asked = []

    def __call__(self, host, port):
        self.asked.append(host)
        answer = self.names.get(host)
        if isinstance(answer, Exception):
            raise answer
        return list(answer or [])


def _urls(servers):
    return [s.spec.url for s in servers]


def test_literals_and_one_address_names_are_used_as_given(monkeypatch):
    _stub_connect(monkeypatch)
    answers = Answers(**{"one.test": ["10.0.0.7"], "gone.test": socket.gaierror("no name")})
    specs = [ServerSpec.parse(u) for u in ("127.0.0.1:7001", "[::1]:7002", "one.test:7003",
                                           "gone.test:7004")]
    pool = ServerPool(specs, TransportConfig(), ("esm2",), resolver=answers)

    async def scenario():
        await pool.connect()
        await asyncio.gather(*pool.connecting)
        await pool.close()

    asyncio.run(scenario())
    assert _urls(pool.contacted) == ["127.0.0.1:7001", "[::1]:7002", "one.test:7003",
                                     "gone.test:7004"]
    assert answers.asked == ["one.test", "gone.test"]  # literals are never looked up


def test_a_name_with_several_addresses_is_one_server_each_and_follows_the_answers(monkeypatch):
    _stub_connect(monkeypatch)
    answers = Answers(**{NAME: ["10.0.0.1", "10.0.0.2"]})
    pool = ServerPool([ServerSpec.parse(f"{NAME}:8001")], TransportConfig(max_in_flight=1),
                      ("esm2",), resolve_every=0, resolver=answers)

    async def scenario():
        await pool.connect()
        await asyncio.gather(*pool.connecting)
        dispatcher = Dispatcher(pool.joined, lambda *a: None, lambda *a: None)
        dispatcher.start()
        metrics = MetricsPoller([s.spec.metrics_url for s in pool.joined])  # as pipeline.py
        pool.feed(dispatcher, metrics)
        await asyncio.sleep(0)
        assert sorted(_urls(dispatcher.servers)) == ["10.0.0.1:8001", "10.0.0.2:8001"]

        answers.names[NAME] = ["10.0.0.2", "10.0.0.3"]     # .1 went, .3 came
        await pool.refresh()
        await asyncio.gather(*pool.connecting)
        await asyncio.sleep(0)
        live = {s.spec.url for s in dispatcher.servers if not s.retired}
        assert live == {"10.0.0.2:8001", "10.0.0.3:8001"}
        assert [s.spec.url for s in dispatcher.servers if s.retired] == ["10.0.0.1:8001"]
        assert sorted(metrics.urls) == ["http://10.0.0.2:8002/metrics",
                                        "http://10.0.0.3:8002/metrics"]

        for answer in (socket.gaierror("temporary failure"), []):  # changes nothing
            answers.names[NAME] = answer
            await pool.refresh()
            assert not pool.connecting
            assert {s.spec.url for s in dispatcher.servers if not s.retired} == live

        answers.names[NAME] = ["10.0.0.3"]     # one address left: its server stays
        await pool.refresh()
        assert {s.spec.url for s in dispatcher.servers if not s.retired} == {"10.0.0.3:8001"}
        assert not dispatcher.failed.is_set()

        answers.names[NAME] = ["10.9.0.1"]     # the only address left cannot be reached
        await pool.refresh()
        assert not dispatcher.failed.is_set()  # while it connects, the run waits
        await asyncio.gather(*pool.connecting, return_exceptions=True)
        await asyncio.sleep(0)
        assert dispatcher.failed.is_set()
        assert isinstance(dispatcher.error, ServerUnavailableError)
        assert "no server left" in str(dispatcher.error)
        await dispatcher.close()
        await pool.close()

    asyncio.run(scenario())


def test_a_name_with_one_address_that_scales_up_becomes_one_server_per_address(monkeypatch):
    _stub_connect(monkeypatch)
    answers = Answers(**{NAME: ["10.0.0.1"]})
    pool = ServerPool([ServerSpec.parse(f"{NAME}:8001")], TransportConfig(max_in_flight=1),
                      ("esm2",), resolve_every=0, resolver=answers)

    async def scenario():
        await pool.connect()
        dispatcher = Dispatcher(pool.joined, lambda *a: None, lambda *a: None)
        dispatcher.start()
        pool.feed(dispatcher, MetricsPoller([]))
        assert _urls(dispatcher.servers) == [f"{NAME}:8001"]   # as given: gRPC resolves it
        answers.names[NAME] = ["10.0.0.2"]                      # still one: nothing changes
        await pool.refresh()
        assert not pool.connecting
        answers.names[NAME] = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        await pool.refresh()
        await asyncio.gather(*pool.connecting)
        await asyncio.sleep(0)
        await dispatcher.close()
        await pool.close()
        return dispatcher

    dispatcher = asyncio.run(scenario())
    assert {s.spec.url: s.retired for s in dispatcher.servers} == {
        f"{NAME}:8001": True, "10.0.0.1:8001": False, "10.0.0.2:8001": False,
        "10.0.0.3:8001": False}


def test_no_lookup_again_before_the_pool_connected(monkeypatch):
    """--resume feeds the dispatcher before it connects (only when a block needs a server)."""
    _stub_connect(monkeypatch)
    answers = Answers(**{NAME: ["10.0.0.1", "10.0.0.2"]})
    pool = ServerPool([ServerSpec.parse(f"{NAME}:8001")], TransportConfig(), ("esm2",),
                      resolve_every=0.01, resolver=answers)

    async def scenario():
        dispatcher = Dispatcher([], lambda *a: None, lambda *a: None)
        pool.feed(dispatcher, MetricsPoller([]))
        await asyncio.sleep(0.05)
        assert answers.asked == [] and pool.contacted == []
        await pool.connect()                       # then the names are followed
        answers.names[NAME] = ["10.0.0.3"]
        await asyncio.sleep(0.05)
        await asyncio.gather(*pool.connecting)
        await dispatcher.close()
        await pool.close()

    asyncio.run(scenario())
    assert _urls(pool.contacted) == ["10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"]
    assert [s.retired for s in pool.contacted] == [True, True, False]


def test_a_slot_of_a_server_that_left_hands_its_request_to_another(monkeypatch):
    class Fake(Server):
        async def embed(self, request, ask=None):
            return np.zeros((len(request.items), 4), np.float32)

    results = []

    async def scenario():
        config = TransportConfig(max_in_flight=1)
        leaving, staying = Fake(ServerSpec.parse("10.0.0.1:1"), config), \
            Fake(ServerSpec.parse("10.0.0.2:1"), config)
        dispatcher = Dispatcher([leaving], lambda r, e: results.append((r, e)), lambda *a: None)
        dispatcher.start()
        await asyncio.sleep(0)                     # its slot waits on the queue
        leaving.retired = True
        dispatcher.submit([Request("esm2", 0, [Item(0, "f0", "MK")])])
        await asyncio.sleep(0.01)
        assert results == [] and dispatcher.queue.qsize() == 1
        dispatcher.add(staying)
        for _ in range(100):
            if results:
                break
            await asyncio.sleep(0.01)
        await dispatcher.close()
        return leaving, staying

    leaving, staying = asyncio.run(scenario())
    assert [r.items[0].frame_id for r, _ in results] == ["f0"]
    assert leaving.stats.requests == {} and staying.stats.requests == {"esm2": 1}


def test_requests_held_by_a_server_that_vanished_go_to_the_others(monkeypatch):
    """A pod that vanishes (no reset, no answer: its requests would wait for --timeout):
    once it left the name and the grace is over, what it held is sent elsewhere, once."""
    _stub_connect(monkeypatch)
    monkeypatch.setattr(servers, "LEAVE_GRACE_S", 0.05)
    vanished = asyncio.Event()

    async def embed(self, request, ask=None):
        if self.spec.url.startswith("10.0.0.1:"):
            await vanished.wait()  # never set
        await asyncio.sleep(0.001)
        return np.zeros((len(request.items), 8), np.float32)

    monkeypatch.setattr(Server, "embed", embed)
    answers = Answers(**{NAME: ["10.0.0.1", "10.0.0.2"]})
    pool = ServerPool([ServerSpec.parse(f"{NAME}:8001")], TransportConfig(max_in_flight=1),
                      ("esm2",), resolve_every=0, resolver=answers)
    results = []

    async def scenario():
        await pool.connect()
        await asyncio.gather(*pool.connecting)
        dispatcher = Dispatcher(pool.joined, lambda r, e: results.append(r.items[0].frame_id),
                                lambda *a: None)
        dispatcher.start()
        pool.feed(dispatcher, MetricsPoller([]))
        await asyncio.sleep(0)
        dispatcher.submit([Request("esm2", 0, [Item(i, f"f{i}", "MK")]) for i in range(6)])
        for _ in range(50):
            await asyncio.sleep(0.01)
        assert len(results) == 5  # one is held by the vanished server
        answers.names[NAME] = ["10.0.0.2"]
        await pool.refresh()
        for _ in range(100):
            if len(results) == 6:
                break
            await asyncio.sleep(0.01)
        await dispatcher.close()
        await pool.close()
        return dispatcher

    dispatcher = asyncio.run(scenario())
    assert sorted(results) == [f"f{i}" for i in range(6)]
    assert dispatcher.error is None
    first, second = pool.contacted
    assert first.retired and first.stats.requests == {}
    assert second.stats.requests == {"esm2": 6}


def test_resolve_every_option():
    parser = cli.build_parser()
    args = parser.parse_args(["--sample", "s.fa", "--server", f"{NAME}:8001",
                              "--resolve-every", "0.5"])
    assert cli.options_from_args(args).resolve_every == 0.5
    args = parser.parse_args(["--sample", "s.fa"])
    assert cli.options_from_args(args).resolve_every == 30.0
    with pytest.raises(SystemExit):
        parser.parse_args(["--sample", "s.fa", "--resolve-every", "-1"])


# ---------------------------------------------------------------- real servers behind one name


ADDRESSES = ("127.0.0.2", "127.0.0.3")
NOTHING = "127.0.0.9"  # listed at first; nothing listens there


class Pods:
    """Two tritonservers, one per loopback address, on the same three ports."""

    def __init__(self, repository: Path, log_dir: Path):
        from embed_server.launcher import free_ports

        self.http, self.grpc, self.metrics = free_ports(3)
        self.repository, self.log_dir = repository, log_dir
        self.servers = {}
        self.errors = []
        self._stop = threading.Event()
        self._threads = []

    def _serve(self, address: str) -> None:
        """Start, serve until stopped, stop: in a thread that lives as long as the server
        (the launcher's child dies with the thread that started it)."""
        from embed_server.launcher import start_server

        try:
            with start_server(self.repository, http_port=self.http, grpc_port=self.grpc,
                              metrics_port=self.metrics, cpu=True, address=address,
                              startup_timeout_s=300,
                              log_file=self.log_dir / f"tritonserver-{address}.log") as server:
                self.servers[address] = server
                self._stop.wait()
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self.errors.append(f"{address}: {e}")

    def start(self) -> "Pods":
        self._threads = [threading.Thread(target=self._serve, args=(a,), daemon=True)
                         for a in ADDRESSES]
        for thread in self._threads:  # in parallel: a start is mostly waiting on 2 cores
            thread.start()
        while len(self.servers) + len(self.errors) < len(ADDRESSES):
            time.sleep(0.2)
        if self.errors:
            self.stop()
            pytest.fail("; ".join(self.errors), pytrace=False)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def kill(self, address: str) -> None:
        """SIGKILL its whole process group (a pod that dies, not one that drains)."""
        os.killpg(self.servers[address].process.pid, signal.SIGKILL)

    def sequences(self, address: str) -> float:
        """embed_sequences_total on that server's own /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://{address}:{self.metrics}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "embed_sequences_total")


@pytest.fixture(scope="module")
def pods(demo_checkpoints, tmp_path_factory):
    from embed_server.repository import assemble_repository

    def hidden_size(checkpoint):   # not imported from conftest: tests/server has a conftest module too
        return int(json.loads((checkpoint / "config.json").read_text())["hidden_size"])

    repository = assemble_repository(  # one instance per model: six stubs are enough for 2 cores
        tmp_path_factory.mktemp("pods_repository"),
        {m: demo_checkpoints / m for m in MODELS},
        embedding_dims={m: hidden_size(demo_checkpoints / m) for m in MODELS},
        symlink=True, cpu_instances=1)
    pods = Pods(repository, tmp_path_factory.mktemp("pods")).start()
    yield pods
    pods.stop()


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    return write_sample(tmp_path_factory.mktemp("pods_sample") / "pods.fasta", n=36, seed=16)


def run_name(pods, sample: Path, out: Path, *extra: str) -> dict:
    code = cli.run(cli.build_parser().parse_args([
        "--sample", str(sample), "--out", str(out), "--server", f"{NAME}:{pods.grpc}",
        "--metrics-url", f"http://{NAME}:{pods.metrics}/metrics", "--max-in-flight", "2",
        "--window", "64", "--token-budget", "400", "--progress", "plain", "--retries", "3",
        *extra]))
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0, summary.get("message")
    return summary


def rows(out: Path):
    return {m: read_model_table(out, m)[1:] for m in MODELS}


@pytest.fixture(scope="module")
def clean_run(pods, sample, tmp_path_factory):
    """The name resolving to both servers, nothing going wrong."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(discovery, "resolve", Answers(**{NAME: list(ADDRESSES)}))
    before = {a: pods.sequences(a) for a in ADDRESSES}
    out = tmp_path_factory.mktemp("clean") / "out"
    try:
        summary = run_name(pods, sample, out)
    finally:
        monkeypatch.undo()
    served = {a: pods.sequences(a) - before[a] for a in ADDRESSES}
    return out, summary, served


@pytest.mark.server
def test_one_name_backed_by_two_servers_splits_the_work(pods, clean_run, sample):
    out, summary, served = clean_run
    frames = expected_frames(sample)
    detail = summary["servers_detail"]
    assert set(detail) == {f"{a}:{pods.grpc}" for a in ADDRESSES}
    for url, server in detail.items():
        assert server["joined"] and not server["left"], url
        assert all(server["requests"].get(m, 0) > 0 for m in MODELS), (url, server)
    for address, sequences in served.items():  # the servers' own counters moved
        assert sequences > 0, (address, served)
    assert sum(served.values()) == len(frames) * len(MODELS)
    for model in MODELS:
        send = summary["stages"]["send"][model]
        assert send["sequences_in"] == send["sequences_received"] == len(frames)
        assert summary["stages"]["write"][model]["rows_final"] == len(frames)
        assert sum(s["sequences"][model] for s in detail.values()) == len(frames)
        ids, _ = rows(out)[model]
        assert ids == [f.frame_id for f in frames]


@pytest.mark.server
def test_servers_join_and_leave_while_running_and_a_killed_one_loses_nothing(
        pods, sample, clean_run, tmp_path, monkeypatch):
    """Starts on .2 and an address where nothing listens; once .2 answered, the name lists
    .2 and .3 (.3 joins, the dead address leaves); once .3 answered 3 requests it is killed
    with requests in flight and its address goes (it leaves): its requests go to .2."""
    live, other = ADDRESSES
    answers = Answers(**{NAME: [live, NOTHING]})
    monkeypatch.setattr(discovery, "resolve", answers)
    events = []
    succeeded = Server.succeeded

    def watch(self, request):
        succeeded(self, request)
        done = sum(self.stats.requests.values())
        if self.spec.url.startswith(live + ":") and "joined" not in events:
            events.append("joined")
            answers.names[NAME] = [live, other]
        elif self.spec.url.startswith(other + ":") and done == 3 and "killed" not in events:
            events.append("killed")
            pods.kill(other)
            answers.names[NAME] = [live]

    monkeypatch.setattr(Server, "succeeded", watch)
    out = tmp_path / "out"
    # Resolved every 0.05 s: the killed server's leaving is seen before .2 finishes the rest (at
    # 0.2 s a loaded whole-suite run once finished first, and the killed server never "left").
    summary = run_name(pods, sample, out, "--resolve-every", "0.05")
    assert events == ["joined", "killed"]
    port = str(pods.grpc)
    detail = summary["servers_detail"]
    gone, killed, stayed = (detail[f"{a}:{port}"] for a in (NOTHING, other, live))
    assert gone["left"] and not gone["joined"] and gone["requests"] == {}
    assert killed["left"] and killed["joined"] and sum(killed["requests"].values()) >= 3
    assert killed["retries"] >= 1           # it went away with requests in flight
    assert not stayed["left"] and sum(stayed["requests"].values()) > 0

    clean_out, clean_summary, _ = clean_run
    clean_rows, got_rows = rows(clean_out), rows(out)
    for model in MODELS:
        for stage in ("send", "write"):
            assert summary["stages"][stage][model] == clean_summary["stages"][stage][model]
        clean_ids, clean_embeddings = clean_rows[model]
        ids, embeddings = got_rows[model]
        assert ids == clean_ids                               # 0 lost, 0 duplicated
        np.testing.assert_allclose(embeddings, clean_embeddings, rtol=1e-4, atol=1e-5)


def test_an_address_that_left_and_came_back_is_one_entry_of_the_summary():
    from types import SimpleNamespace

    from embed_client.report import Report

    spec = ServerSpec.parse("10.0.0.1:8001")
    before, after = Server(spec, TransportConfig()), Server(spec, TransportConfig())
    before.stats.requests, before.stats.sequences = {"esm2": 2}, {"esm2": 7}
    before.stats.retries, before.retired = 1, True
    after.stats.requests = {"esm2": 3, "dnabert_s": 1}
    after.stats.sequences = {"esm2": 9, "dnabert_s": 4}
    report = object.__new__(Report)
    report.pool = SimpleNamespace(contacted=[before, after], joined=[before, after])
    report.metrics = SimpleNamespace(fp8_gate={})
    assert report._servers_detail() == {"10.0.0.1:8001": {
        "joined": True, "left": False, "requests": {"esm2": 5, "dnabert_s": 1},
        "sequences": {"esm2": 16, "dnabert_s": 4}, "retries": 1, "given_up": None, "dtype": {}}}


def test_fewer_requests_than_slots_spread_over_the_servers():
    """Many pods behind one name, little work at a time: one request each, not all on the
    first server's slots."""
    class Fake(Server):
        async def embed(self, request, ask=None):
            await asyncio.sleep(0.05)
            return np.zeros((len(request.items), 4), np.float32)

    async def scenario():
        pods = [Fake(ServerSpec.parse(f"10.0.0.{i}:1"), TransportConfig(max_in_flight=8))
                for i in range(1, 5)]
        done = []
        dispatcher = Dispatcher(pods, lambda r, e: done.append(r), lambda *a: None)
        dispatcher.start()
        await asyncio.sleep(0)
        dispatcher.submit([Request("esm2", 0, [Item(i, f"f{i}", "MK")]) for i in range(4)])
        while len(done) < 4:
            await asyncio.sleep(0.01)
        await dispatcher.close()
        return pods

    pods = asyncio.run(scenario())
    assert [p.stats.requests for p in pods] == [{"esm2": 1}] * 4
