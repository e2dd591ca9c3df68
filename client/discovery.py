"""Server names that stand for several servers: a DNS name with several addresses is all of them.

A Kubernetes headless Service (`clusterIP: None`) answers a DNS query with the address of
every ready pod. `--server virnuc-triton.ns.svc:8001` then means one server per address,
each with its own worker slots in the pull pool; `servers.py` resolves the name again every
`--resolve-every` seconds so that pods that come join the run and pods that go leave it.

The rules (`Entry`):
- an IP literal is never resolved: one server, as given;
- a name that resolves to one address (or not at all) is one server under its name, as
  given: gRPC resolves it itself, as before there was discovery;
- a name that resolves to several addresses is one server per address (`host` replaced by
  the address in the gRPC URL and, when the metrics URL names the same host, there too).
  From then on the name stays expanded: a later answer with one address keeps that one.
- a lookup that fails or answers nothing changes nothing (a DNS hiccup must not empty the
  pool); an address no longer listed leaves: its server pulls no new work, its requests in
  flight finish or go back to the queue (transport.py).
- one address family: IPv4 when the name has any, else IPv6 (a dual-stack pod is one
  server, not two; `localhost` is one server, not 127.0.0.1 and ::1).
- over TLS, a server found by address checks the certificate against the name (the
  Service's name in its certificate, deploy/kubernetes), as connecting by the name would.

`resolve` is looked up at call time: tests point it at servers on 127.0.0.x.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple
from urllib.parse import urlsplit, urlunsplit

from .transport import ServerSpec

Resolver = Callable[[str, int], List[str]]

NAME_KEY = ""  # the key of the one server that keeps the name (not yet expanded)


def resolve(host: str, port: int) -> List[str]:
    """The addresses `host` resolves to for TCP, in the resolver's order, without repeats:
    the IPv4 ones when there are any, else the IPv6 ones."""
    v4: List[str] = []
    v6: List[str] = []
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        found = v4 if family == socket.AF_INET else v6 if family == socket.AF_INET6 else None
        address = str(sockaddr[0]).split("%", 1)[0]  # no IPv6 zone in a URL
        if found is not None and address not in found:
            found.append(address)
    return v4 or v6


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_port(spec: ServerSpec) -> Tuple[str, int]:
    """The host and gRPC port of a parsed spec (`host:port` or `[v6]:port`)."""
    parts = urlsplit("//" + spec.url)
    return parts.hostname or "", int(parts.port)


def _shown(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def address_spec(spec: ServerSpec, address: str) -> ServerSpec:
    """`spec` with its host replaced by `address`, in the gRPC URL and, when the metrics URL
    names the same host, in that too (a metrics URL elsewhere is kept as given)."""
    host, port = host_port(spec)
    metrics = urlsplit(spec.metrics_url)
    metrics_url = spec.metrics_url
    if metrics.hostname == host:
        netloc = _shown(address) + (f":{metrics.port}" if metrics.port else "")
        metrics_url = urlunsplit(metrics._replace(netloc=netloc))
    return ServerSpec(f"{_shown(address)}:{port}", metrics_url, tls_name=host)


@dataclass
class Entry:
    """One --server as given, and the servers it stands for now ({address or NAME_KEY: server})."""

    spec: ServerSpec
    host: str = ""
    port: int = 0
    expanded: bool = False                       # one server per address (from now on)
    servers: Dict[str, object] = field(default_factory=dict)
    failing: Optional[str] = None                # the last lookup's error, logged once

    def __post_init__(self):
        self.host, self.port = host_port(self.spec)

    @property
    def named(self) -> bool:
        """A DNS name (resolved), not an IP literal (used as given)."""
        return not is_address(self.host)

    def plan(self, addresses: Optional[List[str]]
             ) -> Tuple[List[Tuple[str, ServerSpec]], List[str]]:
        """What an answer changes: ([(key, spec) of servers to add], [keys of servers leaving]).

        `addresses` None or empty (a failed or empty lookup) changes nothing once servers
        exist; before that, the name is one server as given."""
        if not addresses:
            return ([] if self.servers else [(NAME_KEY, self.spec)]), []
        if not self.expanded and len(addresses) == 1:
            return ([] if self.servers else [(NAME_KEY, self.spec)]), []
        self.expanded = True
        listed = set(addresses)
        leaving = [key for key in self.servers if key not in listed]
        joining = [(a, address_spec(self.spec, a)) for a in addresses if a not in self.servers]
        return joining, leaving
