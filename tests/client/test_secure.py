"""embed-client (and the locust user) against an embed-server with TLS and an API key.

One such server (dnabert_s only, one CPU instance, a certificate for 127.0.0.1 and localhost
signed by a test CA, client certificates required: mutual TLS) is started once for this
module, as tests/server/test_safety.py starts its own. The key comes from a file or
$EMBED_API_KEY and appears in no output, file or repr.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embed_client import cli
from embed_client.transport import API_KEY_METADATA

from certificates import signed_certificates
from test_end_to_end import expected_frames, read_model_table, run_cli, write_sample

pytestmark = pytest.mark.server

API_KEY = "client-" + "0badc0de" * 4
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def secured(tmp_path_factory, demo_checkpoints, start_embed_server):
    """(server, certificate files) of an embed-server with mutual TLS and an API key."""
    from embed_server.repository import assemble_repository

    root = tmp_path_factory.mktemp("secured_client")
    files = signed_certificates(root)
    repo = assemble_repository(root / "repo", {"dnabert_s": demo_checkpoints / "dnabert_s"},
                               cpu_instances=1)
    with start_embed_server(repo, "the secured embed-server", log_file=root / "tritonserver.log",
                            tls_cert=files["server.crt"], tls_key=files["server.key"],
                            tls_client_ca=files["ca.crt"], api_key=API_KEY) as server:
        yield server, files


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "api.key"
    path.write_text(API_KEY + "\n")
    path.chmod(0o600)
    return path


def client_argv(server, sample: Path, out: Path):
    return ["--sample", str(sample), "--out", str(out), "--models", "dnabert_s",
            "--server", server.grpc_url, "--metrics-url", server.metrics_url,
            "--window", "16", "--progress", "plain", "--retries", "0"]


def client_certificate(files: dict):
    return ["--tls-cert-file", str(files["client.crt"]), "--tls-key-file", str(files["client.key"])]


def no_key_anywhere(out: Path, *texts: str) -> None:
    for text in texts:
        assert API_KEY not in text
    for path in out.rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path


def test_client_over_tls_with_the_api_key(secured, key_file, tmp_path, capsys, monkeypatch):
    server, files = secured
    cert, mine = files["ca.crt"], client_certificate(files)
    sample = write_sample(tmp_path / "S.fasta", n=10, seed=31)
    frames = [f.frame_id for f in expected_frames(sample)]
    monkeypatch.delenv("EMBED_API_KEY", raising=False)
    out = tmp_path / "from_file"
    code = run_cli(*client_argv(server, sample, out), "--tls-ca-file", str(cert), *mine,
                   "--api-key-file", str(key_file), "-v")
    captured = capsys.readouterr()
    assert code == cli.EXIT_OK, captured.err
    assert read_model_table(out, "dnabert_s")[1] == frames
    assert json.loads((out / "summary.json").read_text())["status"] == "complete"
    no_key_anywhere(out, captured.out, captured.err)

    monkeypatch.setenv("EMBED_API_KEY", API_KEY)  # from the environment, with --tls
    out = tmp_path / "from_env"
    code = run_cli(*client_argv(server, sample, out), "--tls", "--tls-ca-file", str(cert), *mine)
    captured = capsys.readouterr()
    assert code == cli.EXIT_OK, captured.err
    assert read_model_table(out, "dnabert_s")[1] == frames
    no_key_anywhere(out, captured.out, captured.err)
    options = cli.options_from_args(cli.build_parser().parse_args(
        client_argv(server, sample, out) + ["--tls"]))
    assert options.transport.api_key == API_KEY and API_KEY not in repr(options)


def test_refusals_are_clear(secured, key_file, tmp_path, capsys, monkeypatch):
    server, files = secured
    sample = write_sample(tmp_path / "S.fasta", n=3, seed=37)
    monkeypatch.delenv("EMBED_API_KEY", raising=False)
    tls = ["--tls-ca-file", str(files["ca.crt"]), *client_certificate(files)]

    code = run_cli(*client_argv(server, sample, tmp_path / "a"), *tls)
    err = capsys.readouterr().err
    assert code == cli.EXIT_SERVER and "needs an API key" in err, err

    wrong = tmp_path / "wrong.key"
    wrong.write_text("not-" + API_KEY)
    code = run_cli(*client_argv(server, sample, tmp_path / "b"), *tls, "--api-key-file", str(wrong))
    err = capsys.readouterr().err
    assert code == cli.EXIT_SERVER and "API key was not accepted" in err, err
    assert "not-" + API_KEY not in err

    code = run_cli(*client_argv(server, sample, tmp_path / "c"), "--api-key-file", str(key_file))
    err = capsys.readouterr().err  # plain gRPC to a TLS server
    assert code == cli.EXIT_SERVER and "unavailable" in err, err
    code = run_cli(*client_argv(server, sample, tmp_path / "c"), "--api-key-file", str(key_file),
                   "--tls-ca-file", str(files["ca.crt"]))
    err = capsys.readouterr().err  # no client certificate for a server that requires one
    assert code == cli.EXIT_SERVER and "unavailable" in err, err

    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    for bad in (["--api-key-file", str(empty)], ["--api-key-file", str(tmp_path / "none")],
                ["--tls-ca-file", str(tmp_path / "none")], ["--tls-ca-file", str(empty)],
                ["--tls-cert-file", str(files["client.crt"])],
                ["--tls-cert-file", str(files["client.key"]), "--tls-key-file",
                 str(files["client.key"])]):
        code = run_cli(*client_argv(server, sample, tmp_path / "d"), *bad)
        err = capsys.readouterr().err
        assert code == cli.EXIT_USAGE and "Traceback" not in err, (bad, err)
        assert not (tmp_path / "d").exists()


def test_key_metadata_is_the_servers():
    frontend = pytest.importorskip("embed_server.frontend")
    assert API_KEY_METADATA == frontend.GRPC_HEADER_PREFIX + frontend.API_KEY_HEADER


def test_locust_user_over_tls_with_the_api_key(secured, key_file, tmp_path):
    if importlib.util.find_spec("locust") is None:
        pytest.skip("the load test needs locust (extra 'perf')")
    server, files = secured
    command = [sys.executable, "-m", "locust", "-f", str(ROOT / "perf" / "locustfile.py"),
               "--headless", "-u", "2", "-r", "2", "--run-time", "12s", "--stop-timeout", "30",
               "--host", server.grpc_url, "--seqs-per-request", "2", "--request-rate", "2",
               "--dnabert-s-weight", "1", "--esm2-weight", "0",
               "--tls-ca-file", str(files["ca.crt"]), "--api-key-file", str(key_file),
               "--tls-cert-file", str(files["client.crt"]),
               "--tls-key-file", str(files["client.key"]),
               "--json", "--only-summary", "--loglevel", "WARNING"]
    env = {k: v for k, v in os.environ.items() if k != "EMBED_API_KEY"}
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env=env)
    stats = json.loads(done.stdout)
    requests = sum(s["num_requests"] for s in stats)
    failures = sum(s["num_failures"] for s in stats)
    assert requests > 0 and failures == 0, (done.stdout[-2000:], done.stderr[-2000:])
    assert API_KEY not in done.stdout and API_KEY not in done.stderr


def test_an_address_found_under_a_name_is_checked_against_the_name(secured, key_file):
    """discovery.py's ServerSpec(address, tls_name=name): the certificate must carry the name
    (here localhost, for 127.0.0.1), and tritonclient's own channel options stay."""
    from embed_client.credentials import channel_args, read_api_key
    from embed_client.transport import Server, ServerSpec, TransportConfig

    server, files = secured
    args = dict(channel_args("localhost"))
    assert args["grpc.ssl_target_name_override"] == "localhost"
    assert args["grpc.max_receive_message_length"] > 1 << 30  # not gRPC's 4 MiB default
    port = server.grpc_url.rsplit(":", 1)[1]

    async def connect(name):
        config = TransportConfig(tls=True, tls_ca_file=files["ca.crt"], retries=0,
                                 tls_cert_file=files["client.crt"],
                                 tls_key_file=files["client.key"],
                                 api_key=read_api_key(key_file))
        spec = dataclasses.replace(ServerSpec.parse(f"127.0.0.1:{port}"), tls_name=name)
        one = Server(spec, config)
        try:
            await one.connect(["dnabert_s"])
            return one.models["dnabert_s"].hidden
        finally:
            await one.close()

    assert asyncio.run(connect("localhost")) > 0
    with pytest.raises(Exception, match="unavailable"):
        asyncio.run(connect("not-the-name.example"))
