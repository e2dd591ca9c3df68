"""perf/simulate_pool.py at small sizes: deterministic, nothing lost or answered twice under
leaves and joins, the measured 1/2/4-GPU scaling reproduced, and the behaviours docs/deploy.md
reports (balance by speed, concentration of the grouped pull, the silent-leave tail)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "perf"))
import simulate_pool as sp  # noqa: E402

SMALL = dict(servers=8, slow_fraction=0.25, leave=1, join=1, clients=2, frames=40_000, seed=3,
             slot_order="interleaved", in_flight=4)


def test_deterministic_and_nothing_lost():
    a = sp.simulate(sp.Config(**SMALL))
    b = sp.simulate(sp.Config(**SMALL))
    assert a == b
    assert a["lost"] == 0 and a["duplicated"] == 0 and a["answered_once"] == a["requests"] > 0
    assert a["retried_sends"] > 0                      # the leaving server's requests went elsewhere
    assert a["balance"]["joined"]["busy_mean"] > 0     # a server that joins late gets work
    assert 0 < a["efficiency"] <= 1
    assert sp.simulate(sp.Config(**dict(SMALL, seed=4))) != a


@pytest.mark.parametrize("servers, measured", [(1, 1233), (2, 2414), (4, 4837)])
def test_reproduces_measured_scaling(servers, measured):
    """perf/RESULTS.md: 1,233 / 2,414 / 4,837 frames/s through Triton on 1 / 2 / 4 H200s, one client."""
    result = sp.simulate(sp.Config(servers=servers, slow_fraction=0, leave=0, frames=60_000 * servers))
    assert result["frames_per_s"] == pytest.approx(measured, rel=0.06)


def test_pull_balances_by_speed():
    """With the queue kept non-empty, a 2x slower server answers about half as much."""
    result = sp.simulate(sp.Config(servers=8, slow_fraction=0.5, leave=0, clients=4, frames=60_000,
                                   slot_order="interleaved", in_flight=2))
    normal, slow = result["balance"]["normal"], result["balance"]["slow"]
    assert slow["frames_per_s_mean"] == pytest.approx(normal["frames_per_s_mean"] / 2, rel=0.25)
    assert result["efficiency"] > 0.75


def test_grouped_pull_concentrates_on_few_servers():
    """embed-client's workers wait server by server: with far more slots than open requests, a
    block's requests land on one server's slots; interleaving spreads them (docs/deploy.md)."""
    base = dict(servers=32, slow_fraction=0, leave=0, frames=100_000)
    grouped = sp.simulate(sp.Config(**base))
    interleaved = sp.simulate(sp.Config(**base, slot_order="interleaved"))
    assert grouped["efficiency"] < 0.35
    assert interleaved["frames_per_s"] > 2 * grouped["frames_per_s"]


def test_silent_leave_holds_blocks_until_the_deadline():
    base = dict(servers=8, slow_fraction=0, leave=1, clients=1, frames=80_000, timeout_s=60.0,
                slot_order="interleaved", in_flight=2, seed=1)
    reset = sp.simulate(sp.Config(**base))
    silent = sp.simulate(sp.Config(**base, leave_mode="silent"))
    assert reset["lost"] == silent["lost"] == 0 and silent["duplicated"] == 0
    assert silent["makespan_s"] > reset["makespan_s"] + 0.5 * base["timeout_s"]


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "sim.json"
    assert sp.main(["--servers", "4", "--frames", "20000", "--leave", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["servers"] == 4 and result["lost"] == 0
    assert "answered once" in capsys.readouterr().out
