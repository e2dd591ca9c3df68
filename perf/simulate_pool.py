"""Discrete-event simulation of embed-client's pull pool over many Triton servers.

How the client works (client/transport.py, client/dispatcher.py, client/pipeline.py), and so what is simulated:

- Each client preps its sample in one thread, a block of `window` frames at a time; a block
  is opened (its length-sorted requests queued) only while fewer than MAX_OPEN_BLOCKS (6) are
  open and the shared queue holds fewer requests than there are worker slots in all; a block
  stays open until all its answers are in and its parts are written (one commit at a time).
- Every server gets `in_flight` worker slots per client (8 per model instance: 24 for one
  ESM-2 and two DNABERT-S instances per GPU). A free slot pulls the next request from its
  client's one queue (retried requests first, then in order), sends it and waits for the
  answer; slots that wait for work are served first come, first served. A faster server
  answers sooner, so its slots pull more: nothing assigns work to servers.
- A failed request (connection reset, refused, deadline) goes back to the front of the queue
  for any server to take; its server backs off 0.5, 1, 2 ... 30 s per failure round and is
  given up after `retries` rounds. A server that leaves with a reset fails its requests at
  once; one that vanishes silently (node lost, packets dropped) holds them until the
  request deadline (`--timeout`, 600 s by default), then new sends fail after a connect
  timeout.
- A server runs its requests one after another (the GPU) at its speed; answers travel back
  over the client host's network link (one link per client, first come first served).

GPU costs come from perf/RESULTS.md (one H200, mixed run): ESM-2 3B 98,706 tokens/s, DNABERT-S
1.64M tokens/s: ~1,200 frames/s per GPU, as measured end to end (1,209-1,233). Frames have
45-100 residues (perf/README.md's e2e sample: ~77 on average). Client prep: ~68,000 frames/s
per core (perf/bench_prep.py, validate + stream + prep + bucket, CPU time).

    python3 perf/simulate_pool.py                                  # 64 servers, 1/4 2x slower, 4 leave
    python3 perf/simulate_pool.py --clients 8 --frames 200000 --leave-mode silent --json out.json

Pure Python, deterministic for a seed. Prints balance (busy fraction per server class), the
tail (end of run minus the time the last request was first pulled), retries, and checks that
every request was answered exactly once.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import itertools
import json
import math
import random
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional

ESM2_TOKENS_PER_S = 98_706.0       # per H200, mixed run (perf/RESULTS.md, 4x H200 kernels3 run)
DNABERT_TOKENS_PER_S = 1_641_364.0  # per H200, alone through Triton (answering-thread run)
ESM2_HIDDEN, DNABERT_HIDDEN = 2560, 768
PREP_FRAMES_PER_S = 68_000.0       # one client core: validate + stream + prep + bucket (bench_prep.py)
MAX_OPEN_BLOCKS = 6                # client/pipeline.py
AGAIN, NEW = 0, 1                  # queue priorities (client/dispatcher.py)


@dataclass
class Config:
    servers: int = 64
    slow_fraction: float = 0.25          # share of servers running at 1 / slow_factor
    slow_factor: float = 2.0
    leave: int = 4                       # servers that leave during the run
    leave_mode: str = "reset"            # reset: fail fast | silent: hang until the deadline
    leave_between: tuple = (0.2, 0.6)    # when they leave, as fractions of the ideal run time
    join: int = 0                        # servers that join during the run (not in the pool at start)
    clients: int = 1                     # samples embedding at once, each its own client
    frames: int = 400_000                # frames per client
    window: int = 8192                   # frames per block
    token_budget: int = 65536            # estimated tokens per request
    max_batch: int = 1024
    in_flight: int = 24                  # slots per server per client (8 per instance, 3 instances)
    slot_order: str = "grouped"          # grouped: a server's slots wait together (the client today)
                                         # rotated: grouped, each client's server list rotated
                                         # interleaved: slot 1 of every server, then slot 2, ...
    max_open_blocks: int = MAX_OPEN_BLOCKS
    prep_frames_per_s: float = PREP_FRAMES_PER_S
    network_gbps: float = 10.0           # each client host's link (answers: ~13 KB per frame)
    rtt_s: float = 0.0005
    write_mb_per_s: float = 1000.0       # a block's parts written at this rate (one at a time)
    timeout_s: float = 600.0             # request deadline (embed-client --timeout)
    retries: int = 10
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    refuse_s: float = 0.001              # a send to a reset server fails after this
    connect_timeout_s: float = 20.0      # a send to a silently vanished server fails after this
    seed: int = 0

    def delay(self, failures: int) -> float:
        return min(self.backoff_max_s, self.backoff_s * 2 ** max(0, failures - 1))


@dataclass
class Request:
    rid: int
    client: int
    block: int
    model: str
    frames: int
    cost_s: float            # GPU seconds on a speed-1 server
    answer_bytes: int
    attempts: int = 0
    answers: int = 0


@dataclass
class Server:
    sid: int
    speed: float
    kind: str                      # normal | slow
    join_at: float = 0.0
    leave_at: Optional[float] = None
    alive: bool = True
    fifo: Deque = field(default_factory=deque)
    running: Optional[tuple] = None
    busy_s: float = 0.0
    work_s: float = 0.0            # GPU seconds answered, at speed 1


@dataclass
class Link:
    """One client's view of one server (client/transport.py's Server): backoff state."""
    server: Server
    failures: int = 0
    available_at: float = 0.0
    dead: bool = False


@dataclass
class Slot:
    client: "Client"
    link: Link
    busy: bool = False


@dataclass
class Block:
    number: int
    remaining: int
    frames: int                    # its sample frames (each in one esm2 request)


class Client:
    def __init__(self, cid: int, frames: int):
        self.cid = cid
        self.frames = frames
        self.queue: List[tuple] = []                 # (priority, order, request)
        self.order = itertools.count()
        self.waiting: Deque[Slot] = deque()          # slots blocked in queue.get(), FIFO
        self.links: List[Link] = []
        self.open: Dict[int, Block] = {}
        self.next_block = 0
        self.ready_block: Optional[List[Request]] = None
        self.net_free_at = 0.0
        self.write_free_at = 0.0
        self.done_frames = 0
        self.finished_at: Optional[float] = None
        self.failed_at: Optional[float] = None     # every server given up: the run ends, resumable
        self.last_first_pull = 0.0


class Simulation:
    def __init__(self, config: Config):
        self.c = config
        self.rng = random.Random(config.seed)
        self.events: List[tuple] = []
        self.seq = itertools.count()
        self.now = 0.0
        self.rid = itertools.count()
        self.requests: List[Request] = []
        self.retried = 0
        self.servers = self._make_servers()
        self.clients = [Client(i, config.frames) for i in range(config.clients)]

    # ------------------------------------------------------------------ set-up

    def _make_servers(self) -> List[Server]:
        c, rng = self.c, self.rng
        n_slow = round(c.servers * c.slow_fraction)
        kinds = ["slow"] * n_slow + ["normal"] * (c.servers - n_slow)
        rng.shuffle(kinds)
        servers = [Server(i, 1.0 / c.slow_factor if k == "slow" else 1.0, k) for i, k in enumerate(kinds)]
        ideal = self.ideal_time(servers)
        order = list(range(c.servers))
        rng.shuffle(order)
        lo, hi = c.leave_between
        for sid in order[:c.leave]:
            servers[sid].leave_at = ideal * rng.uniform(lo, hi)
        for sid in order[c.leave:c.leave + c.join]:
            servers[sid].join_at = ideal * rng.uniform(lo, hi)
        return servers

    def frame_cost(self) -> float:
        """Mean GPU seconds per frame (residues 45-100, uniform)."""
        residues = (45 + 100) / 2
        return (residues + 2) / ESM2_TOKENS_PER_S + (3 * residues / 4.5 + 2) / DNABERT_TOKENS_PER_S

    def ideal_time(self, servers: List[Server]) -> float:
        """Run time with perfect balance and no overheads, over the servers' capacity."""
        work = self.c.frames * self.c.clients * self.frame_cost()
        speed = sum(s.speed for s in servers)
        return work / speed

    def capacity_bound(self) -> float:
        """The earliest time the servers' capacity (joins and leaves included) covers the work."""
        work = sum(r.cost_s for r in self.requests)

        def capacity(t):
            total = 0.0
            for s in self.servers:
                end = t if s.leave_at is None else min(t, s.leave_at)
                total += s.speed * max(0.0, end - s.join_at)
            return total

        if all(s.leave_at is not None for s in self.servers):
            return math.inf                                   # every server leaves: never covered
        lo, hi = 0.0, 1.0
        while capacity(hi) < work:
            hi *= 2
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if capacity(mid) < work else (lo, mid)
        return hi

    # ------------------------------------------------------------------ engine

    def at(self, t: float, fn, *args) -> None:
        heapq.heappush(self.events, (t, next(self.seq), fn, args))

    def run(self) -> dict:
        for server in self.servers:
            if server.leave_at is not None:
                self.at(server.leave_at, self.leave, server)
            if server.join_at > 0:
                server.alive = False
                self.at(server.join_at, self.join, server)
        for client in self.clients:
            links = [Link(s) for s in self.servers if s.join_at == 0]
            client.links.extend(links)
            if self.c.slot_order == "rotated":      # each client lists the servers from another one
                shift = client.cid * len(links) // max(1, self.c.clients)
                links = links[shift:] + links[:shift]
            if self.c.slot_order == "interleaved":
                slots = [Slot(client, link) for _ in range(self.c.in_flight) for link in links]
            else:   # Dispatcher.start(): every server's workers in turn, each waits in queue.get()
                slots = [Slot(client, link) for link in links for _ in range(self.c.in_flight)]
            for slot in slots:
                self.slot_loop(slot)
            self.start_prep(client)
        while self.events:
            t, _, fn, args = heapq.heappop(self.events)
            self.now = t
            fn(*args)
        return self.report()

    def add_link(self, client: Client, server: Server) -> None:
        link = Link(server)
        client.links.append(link)
        for _ in range(self.c.in_flight):
            self.slot_loop(Slot(client, link))

    # ------------------------------------------------------------------ the client's producer

    def start_prep(self, client: Client) -> None:
        if client.failed_at is not None:
            return
        first = client.next_block * self.c.window
        if first >= client.frames:
            return
        n = min(self.c.window, client.frames - first)
        self.at(self.now + n / self.c.prep_frames_per_s, self.prepped, client, n)

    def prepped(self, client: Client, n: int) -> None:
        client.ready_block = self.cut_block(client, client.next_block, n)
        client.next_block += 1
        self.try_open(client)

    def cut_block(self, client: Client, number: int, n: int) -> List[Request]:
        """The block's requests per model, length-sorted and cut by the token budget (schedule.py)."""
        residues = sorted(self.rng.randint(45, 100) for _ in range(n))
        per_model = []
        for model, estimate, cost, hidden in (
                ("esm2", lambda r: r + 2, lambda r: (r + 2) / ESM2_TOKENS_PER_S, ESM2_HIDDEN),
                ("dnabert_s", lambda r: math.ceil(3 * r / 4) + 2,
                 lambda r: (3 * r / 4.5 + 2) / DNABERT_TOKENS_PER_S, DNABERT_HIDDEN)):
            requests, current, tokens = [], [], 0
            for r in residues + [None]:
                if r is None or (current and (tokens + estimate(r) > self.c.token_budget
                                              or len(current) >= self.c.max_batch)):
                    if current:
                        request = Request(next(self.rid), client.cid, number, model, len(current),
                                          sum(cost(x) for x in current), len(current) * hidden * 4)
                        requests.append(request)
                        self.requests.append(request)
                    current, tokens = [], 0
                if r is not None:
                    current.append(r)
                    tokens += estimate(r)
            per_model.append(requests)
        merged = itertools.zip_longest(*per_model)           # interleave(): every model has work
        return [r for group in merged for r in group if r is not None]

    def try_open(self, client: Client) -> None:
        if client.ready_block is None or client.failed_at is not None:
            return
        slots = self.c.in_flight * sum(1 for link in client.links if link.server.join_at <= self.now)
        if client.open and (len(client.open) >= self.c.max_open_blocks or len(client.queue) >= slots):
            return
        requests, client.ready_block = client.ready_block, None
        client.open[requests[0].block] = Block(requests[0].block, len(requests),
                                               sum(r.frames for r in requests if r.model == "esm2"))
        for request in requests:
            self.submit(client, request, NEW)
        self.start_prep(client)

    # ------------------------------------------------------------------ the transport

    def submit(self, client: Client, request: Request, priority: int) -> None:
        heapq.heappush(client.queue, (priority, next(client.order), request))
        while client.waiting and client.queue:
            slot = client.waiting.popleft()
            self.pull(slot)

    def slot_loop(self, slot: Slot) -> None:
        link = slot.link
        if link.dead:
            return
        if link.available_at > self.now:
            self.at(link.available_at, self.slot_loop, slot)
            return
        if slot.client.queue:
            self.pull(slot)
        else:
            slot.client.waiting.append(slot)

    def pull(self, slot: Slot) -> None:
        _, _, request = heapq.heappop(slot.client.queue)
        if request.attempts == 0:
            slot.client.last_first_pull = self.now
        request.attempts += 1
        server = slot.link.server
        if not server.alive:
            wait = self.c.refuse_s if self.c.leave_mode == "reset" else self.c.connect_timeout_s
            self.at(self.now + min(wait, self.c.timeout_s), self.failed, slot, request)
            return
        self.at(self.now + self.c.rtt_s / 2, self.arrive, server, slot, request, self.now)

    def arrive(self, server: Server, slot: Slot, request: Request, sent: float) -> None:
        if not server.alive:
            self.fail_after_leave(slot, request, sent)
            return
        server.fifo.append((slot, request, sent))
        if server.running is None:
            self.start_next(server)

    def start_next(self, server: Server) -> None:
        slot, request, sent = server.fifo.popleft()
        duration = request.cost_s / server.speed
        token = object()
        server.running = (slot, request, sent, token, self.now)
        self.at(self.now + duration, self.computed, server, token)

    def computed(self, server: Server, token) -> None:
        if server.running is None or server.running[3] is not token:
            return                                            # it left meanwhile
        slot, request, sent, _, started = server.running
        server.running = None
        server.busy_s += self.now - started
        server.work_s += request.cost_s
        client = slot.client
        start = max(self.now + self.c.rtt_s / 2, client.net_free_at)
        client.net_free_at = start + request.answer_bytes * 8 / (self.c.network_gbps * 1e9)
        self.at(client.net_free_at, self.answered, slot, request)
        if server.fifo:
            self.start_next(server)

    def fail_after_leave(self, slot: Slot, request: Request, sent: float) -> None:
        if self.c.leave_mode == "reset":
            self.at(self.now + self.c.refuse_s, self.failed, slot, request)
        else:                                                  # silent: the deadline
            self.at(max(self.now, sent + self.c.timeout_s), self.failed, slot, request)

    def leave(self, server: Server) -> None:
        server.alive = False
        pending = list(server.fifo)
        server.fifo.clear()
        if server.running is not None:
            slot, request, sent, _, started = server.running
            server.busy_s += self.now - started
            pending.append((slot, request, sent))
            server.running = None
        for slot, request, sent in pending:
            self.fail_after_leave(slot, request, sent)

    def join(self, server: Server) -> None:
        server.alive = True
        for client in self.clients:
            self.add_link(client, server)
            self.try_open(client)

    def failed(self, slot: Slot, request: Request) -> None:
        client, link = slot.client, slot.link
        self.retried += 1
        self.submit(client, request, AGAIN)                  # any server may take it, first
        if self.now >= link.available_at:                    # a new backoff round
            link.failures += 1
            if link.failures > self.c.retries:
                link.dead = True
                if all(other.dead for other in client.links):  # ServerUnavailableError: run ends
                    client.failed_at = self.now
                    client.queue.clear()
                    client.waiting.clear()
                    client.ready_block = None
                    client.next_block = math.inf
            else:
                link.available_at = self.now + self.c.delay(link.failures)
        self.slot_loop(slot)

    def answered(self, slot: Slot, request: Request) -> None:
        client = slot.client
        request.answers += 1
        if client.failed_at is not None:
            return
        slot.link.failures = 0
        block = client.open[request.block]
        block.remaining -= 1
        if block.remaining == 0:
            size_mb = block.frames * (ESM2_HIDDEN + DNABERT_HIDDEN) * 4 / 1e6
            client.write_free_at = max(self.now, client.write_free_at) + size_mb / self.c.write_mb_per_s
            self.at(client.write_free_at, self.committed, client, block)
        self.try_open(client)
        self.slot_loop(slot)

    def committed(self, client: Client, block: Block) -> None:
        del client.open[block.number]
        client.done_frames += block.frames
        if client.done_frames >= client.frames:
            client.finished_at = self.now
        self.try_open(client)

    # ------------------------------------------------------------------ results

    def report(self) -> dict:
        c = self.c
        done = [cl for cl in self.clients if cl.finished_at is not None]
        end = max((cl.finished_at for cl in done), default=math.inf)
        if len(done) < len(self.clients):
            end = math.inf
        failed = {cl.cid for cl in self.clients if cl.failed_at is not None}
        answers = [r.answers for r in self.requests if r.client not in failed]
        bound = self.capacity_bound()
        classes = {}
        for server in self.servers:
            if server.leave_at is not None:
                kind = "left"
            elif server.join_at > 0:
                kind = "joined"
            else:
                kind = server.kind
            alive_until = end if server.leave_at is None else min(end, server.leave_at)
            alive = max(1e-9, alive_until - server.join_at)
            classes.setdefault(kind, []).append({"busy": server.busy_s / alive,
                                                 "frames_per_s": server.work_s / self.frame_cost() / alive,
                                                 "speed": server.speed})
        balance = {}
        for kind, rows in sorted(classes.items()):
            busy = [r["busy"] for r in rows]
            rate = [r["frames_per_s"] for r in rows]
            balance[kind] = {"servers": len(rows), "speed": rows[0]["speed"],
                             "busy_min": round(min(busy), 4), "busy_mean": round(sum(busy) / len(busy), 4),
                             "busy_max": round(max(busy), 4),
                             "frames_per_s_mean": round(sum(rate) / len(rate), 1)}
        total_frames = c.frames * c.clients
        capacity = sum(s.speed for s in self.servers) / self.frame_cost()
        return {
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(c).items()},
            "requests": len(self.requests),
            "clients_failed": len(failed),     # every server given up: ended, resumable with --resume
            "answered_once": sum(1 for a in answers if a == 1),
            "lost": sum(1 for a in answers if a == 0),
            "duplicated": sum(1 for a in answers if a > 1),
            "retried_sends": self.retried,
            "makespan_s": round(end, 3),
            "capacity_bound_s": round(bound, 3),
            "efficiency": round(bound / end, 4),
            "frames_per_s": round(total_frames / end, 1),
            "capacity_frames_per_s": round(capacity, 1),
            "prep_bound_frames_per_s": round(c.prep_frames_per_s * c.clients, 1),
            "tail_s": round(end - max(cl.last_first_pull for cl in self.clients), 3),
            "slow_request_s": round(max(r.cost_s for r in self.requests) * c.slow_factor, 3),
            "balance": balance,
            "given_up": sum(1 for cl in self.clients for link in cl.links if link.dead),
        }


def simulate(config: Config) -> dict:
    return Simulation(config).run()


def main(argv=None) -> int:
    defaults = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        if f.name == "leave_between":
            p.add_argument("--leave-between", type=float, nargs=2, default=defaults.leave_between,
                           help="leave/join window, fractions of the ideal run time")
        elif f.name == "leave_mode":
            p.add_argument("--leave-mode", choices=("reset", "silent"), default=defaults.leave_mode)
        elif f.name == "slot_order":
            p.add_argument("--slot-order", choices=("grouped", "rotated", "interleaved"), default=defaults.slot_order,
                           help="grouped: as embed-client starts its workers today")
        else:
            p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                           default=getattr(defaults, f.name))
    p.add_argument("--json", help="write the result here too")
    args = vars(p.parse_args(argv))
    out = args.pop("json")
    args["leave_between"] = tuple(args["leave_between"])
    result = simulate(Config(**args))
    text = json.dumps(result, indent=2)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")
    r = result
    print(f"{r['config']['servers']} servers, {r['config']['clients']} client(s) x {r['config']['frames']:,} frames: "
          f"{r['makespan_s']:.1f} s ({r['frames_per_s']:,.0f} frames/s; servers' capacity "
          f"{r['capacity_frames_per_s']:,.0f}, clients' prep {r['prep_bound_frames_per_s']:,.0f}); "
          f"efficiency {r['efficiency']:.1%} of the capacity bound {r['capacity_bound_s']:.1f} s")
    print(f"tail {r['tail_s']:.1f} s after the last first pull (a slow server's largest request: "
          f"{r['slow_request_s']:.2f} s); {r['retried_sends']} sends retried; servers given up {r['given_up']}")
    if r["clients_failed"]:
        print(f"{r['clients_failed']} client(s) gave every server up: their runs ended (resumable with --resume)")
    print(f"requests {r['requests']}: answered once {r['answered_once']}, lost {r['lost']}, "
          f"duplicated {r['duplicated']} (of the clients that finished)")
    print("class     servers  speed  busy min / mean / max   frames/s per server")
    for kind, b in r["balance"].items():
        print(f"{kind:<9} {b['servers']:>7}  {b['speed']:>5.2f}  {b['busy_min']:>6.1%} / {b['busy_mean']:>6.1%} / "
              f"{b['busy_max']:>6.1%}   {b['frames_per_s_mean']:>10,.0f}")
    return 0 if r["lost"] == 0 and r["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
