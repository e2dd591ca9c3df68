"""embed-client's rough edges (issue 15, deliverable 5): --help's defaults, --version, the
per-GPU labels and metrics URLs, a given-up server said once, --resume reusing the first run's
options."""

from __future__ import annotations

import re
from importlib.metadata import version

import pytest

from embed_client import cli


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
