"""``ftmpi-run experiment paper`` end to end at a tiny time scale: the no-failure control and a
stateless run with one server kill, then the table, per-rank resources and figures."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from launch.figures import FIGURES
from launch.results import COLUMNS
from tests.conftest import run_command

pytestmark = pytest.mark.mpi

CELLS = ("none-sync-k0", "stateless-sync-k1")


@pytest.mark.timeout(200)
def test_paper_experiment_writes_its_table_and_figures(tmp_path):
    out = tmp_path / "exp"
    res = run_command(
        [
            *(sys.executable, "-m", "launch.cli", "experiment", "paper"),
            *("--time-scale", "0.05", "--only", ",".join(CELLS), "--out", str(out)),
            *("--kill-offset", "12", "--exit-grace", "5", "--sample-every", "0.25"),
        ],
        timeout=180,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(out / "results.csv", newline="") as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert tuple(rows[CELLS[0]]) == COLUMNS and set(rows) == set(CELLS)
    control, stateless = rows["none-sync-k0"], rows["stateless-sync-k1"]
    assert control["status"].startswith("ok") and stateless["status"].startswith("ok"), rows
    assert float(control["final_accuracy"]) > 0.5
    assert control["updates_lost"] == "0" and control["recoveries"] == "0"
    assert stateless["recoveries"] == "1"
    assert int(stateless["gradients_replayed"]) > 0  # steps logged while the server was down
    assert stateless["updates_lost"] == "0"  # ... and every one of them applied
    for row in rows.values():
        assert float(row["worker_cpu_pct"]) > 0 and float(row["server_peak_rss_mb"]) > 10
    md = (out / "results.md").read_text()
    assert all(f"| {c} |" in md for c in CELLS)
    with open(out / "ranks.csv", newline="") as f:
        roles = {(r["cell"], r["role"]) for r in csv.DictReader(f)}
    assert {(c, "worker") for c in CELLS} | {(c, "server 0") for c in CELLS} <= roles

    for name in FIGURES:
        png = (out / "figures" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name
        data = json.loads((out / "figures" / f"{name}.json").read_text())
        assert set(data["panels"]) == {"none (sync)", "stateless (sync)"}, name
        for panel in data["panels"].values():
            assert panel and all(len(s["x"]) == len(s["y"]) > 0 for s in panel), name
    accuracy = json.loads((out / "figures" / "accuracy.json").read_text())["panels"]
    (killed,) = accuracy["stateless (sync)"]
    (band,) = killed["bands"]  # kill at 1.5 s on the paper clock, then the replacement
    assert 0 <= band[0] < band[1] <= killed["x"][-1] + 5
    assert accuracy["none (sync)"][0]["bands"] == []
