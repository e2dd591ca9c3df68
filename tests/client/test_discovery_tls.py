"""A --server name with several addresses over TLS: each address is checked against the name.

A Kubernetes headless Service's pods share one certificate that names the Service
(deploy/kubernetes), not each pod's address. One embed-server with TLS on 127.0.0.2 whose
certificate names only `pods.test`; `discovery.resolve` answers 127.0.0.2 and an address
where nothing listens for that name. The run completes; the same server given by its address
is refused (the certificate does not name it), so it is the name that was checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embed_client import cli, discovery

from certificates import self_signed
from test_discovery import Answers
from test_end_to_end import expected_frames, write_sample

pytestmark = pytest.mark.server

NAME = "pods.test"
ADDRESS = "127.0.0.2"


@pytest.fixture(scope="module")
def tls_pod(tmp_path_factory, demo_checkpoints, start_embed_server):
    """(gRPC port, CA file) of an embed-server with TLS on 127.0.0.2, certificate for NAME."""
    from embed_server.repository import assemble_repository

    root = tmp_path_factory.mktemp("tls_pod")
    cert, key = self_signed(root, subject=f"/CN={NAME}", alt_names=f"DNS:{NAME}")
    repo = assemble_repository(root / "repo", {"dnabert_s": demo_checkpoints / "dnabert_s"},
                               symlink=True, cpu_instances=1)
    with start_embed_server(repo, "the TLS embed-server", address=ADDRESS,
                            log_file=root / "tritonserver.log", tls_cert=cert, tls_key=key) as server:
        yield server.options.grpc_port, cert


def run(sample: Path, out: Path, server: str, cert: Path) -> int:
    return cli.run(cli.build_parser().parse_args([
        "--sample", str(sample), "--out", str(out), "--server", server, "--tls-ca-file",
        str(cert), "--models", "dnabert_s", "--retries", "1", "--progress", "plain"]))


def test_addresses_of_a_name_are_checked_against_the_name(tls_pod, tmp_path, monkeypatch):
    port, cert = tls_pod
    monkeypatch.setattr(discovery, "resolve", Answers(**{NAME: [ADDRESS, "127.0.0.9"]}))
    sample = write_sample(tmp_path / "s.fasta", n=8, seed=3)
    assert run(sample, tmp_path / "out", f"{NAME}:{port}", cert) == cli.EXIT_OK
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    frames = len(expected_frames(sample))
    assert summary["stages"]["write"]["dnabert_s"]["rows_final"] == frames
    assert summary["servers_detail"][f"{ADDRESS}:{port}"]["sequences"] == {"dnabert_s": frames}

    # Control: the same server by its address alone is refused (its certificate names NAME).
    assert run(sample, tmp_path / "by_address", f"{ADDRESS}:{port}", cert) == cli.EXIT_SERVER
