"""embed-client's rough edges (issue 15, deliverable 5): --help's defaults, --version, the
per-GPU labels and metrics URLs, a given-up server said once, --resume reusing the first run's
options."""

from __future__ import annotations

import json
import logging
import re
from importlib.metadata import version

import pytest

from embed_client import cli
from embed_client.progress import Counters, MetricsPoller, Progress
from embed_client.transport import Server, ServerSpec, TransportConfig


def _help(capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_says_each_default_once_and_never_none(capsys):
    text = _help(capsys)
    assert "(default: None)" not in text and "(default: False)" not in text
    assert not re.search(r"\(default: [^)]*\)\s*\(default:", text), "a default said twice"
    for action in cli.build_parser()._actions:  # each option's own help: one default at most
        shown = (cli._HelpFormatter("embed-client")._get_help_string(action) or "").replace(
            "%(default)s", "X")
        assert shown.count("(default") <= 1, action.dest
    assert "(default: 300)" in text and "(default: error)" in text and "(default: 65536)" in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"embed-client {version('virnuc-embed')}"


class _Lines(logging.Handler):
    """The messages of one logger (the CLI's logger does not propagate to caplog's)."""

    def __init__(self, name: str):
        super().__init__(logging.DEBUG)
        self.messages = []
        self.logger = logging.getLogger(name)

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)


def test_metrics_url_follows_the_grpc_port():
    assert ServerSpec.parse("gpu-1:9001").metrics_url == "http://gpu-1:9002/metrics"
    assert ServerSpec.parse("gpu-1").metrics_url == "http://gpu-1:8002/metrics"
    assert ServerSpec.parse("gpu-1:9001", "gpu-1:7000").metrics_url == "http://gpu-1:7000/metrics"


def test_unreadable_metrics_are_said_once_and_cpu_is_labelled_cpu():
    from embed_server.launcher import free_ports

    url = f"http://127.0.0.1:{free_ports(1)[0]}/metrics"
    poller = MetricsPoller([url], timeout=0.5)
    with _Lines("embed_client.progress") as lines:
        for _ in range(3):
            poller.poll()
    said = [m for m in lines.messages if "per-GPU figures unavailable" in m]
    assert len(said) == 1 and url in said[0] and "--metrics-url" in said[0]
    poller.rates = {("http://h:8002/metrics", "cpu"): 5.0, ("http://h:8002/metrics", "0"): 7.0}
    gpus = Progress(Counters(), poller, tty=False).snapshot()["gpus"]
    assert set(gpus) == {"h:8002 cpu", "h:8002 gpu 0"}


def test_a_given_up_server_is_said_once_with_the_count():
    server = Server(ServerSpec.parse("127.0.0.1:1"), TransportConfig(retries=2))
    with _Lines("embed_client") as lines:
        for _ in range(12):          # 12 requests in flight fail, each after the backoff ended
            server.available_at = 0.0
            server.failed(RuntimeError("connection refused"))
    given_up = [m for m in lines.messages if "given up" in m]
    assert server.dead and len(given_up) == 1
    assert "after 2 retries (3 failed requests" in given_up[0]
    assert server.stats.retries == 12


def test_resume_takes_the_first_runs_options(embed_server, tmp_path, disk_full_at_block, capsys):
    from test_end_to_end import write_sample

    sample = write_sample(tmp_path / "s.fa", n=6, seed=4)
    out = tmp_path / "out"
    live = ["--sample", str(sample), "--out", str(out), "--server", embed_server.grpc_url,
            "--metrics-url", embed_server.metrics_url]
    arm, disarm = disk_full_at_block
    arm(2)
    first = ["--chunk", "500", "--window", "5", "--skip-bad-records", "--include", "mean,bos"]
    assert cli.run(cli.build_parser().parse_args(live + first)) == cli.EXIT_OUTPUT
    disarm()
    capsys.readouterr()

    def resume(*extra):
        return cli.run(cli.build_parser().parse_args(live + ["--resume", *extra]))

    assert resume("--window", "6", "--chunk", "500") == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--window 6 (the first run's: 5)" in err and "--chunk" not in err.split("--window")[0]
    assert resume("--window", "5") == cli.EXIT_OK, capsys.readouterr().err
    err = capsys.readouterr().err
    assert ("resume: the first run's options (run.json): --chunk 500, --skip-bad-records on, "
            "--include mean,bos") in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["chunk"] == 500
    assert summary["resumed"]["blocks"] >= 1
    # run.json and manifest.jsonl stay, the run's record (--help says so); parts/ is gone
    assert (out / "run.json").is_file() and (out / "manifest.jsonl").is_file()
    assert not (out / "parts").exists()
    assert resume() == cli.EXIT_OK                   # finished: said so, options still taken
    assert "already embedded" in capsys.readouterr().out
    assert "run's record, kept when it completes: run.json" in _help(capsys)
