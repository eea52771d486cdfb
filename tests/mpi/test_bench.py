"""``ftmpi-run bench`` runs one tiny throughput case and writes JSON with the expected keys
(no performance assertions)."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks.suites import limits_command
from tests.conftest import run_command

pytestmark = pytest.mark.mpi


def test_bench_quick_tiny_case_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    res = run_command(
        [
            *(sys.executable, "-m", "launch.cli", "bench", "throughput", "--quick"),
            *("--params", "20000", "--only", "1 server", "--out", str(out)),
        ],
        timeout=280,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "### throughput" in res.stdout and "### targets" in res.stdout
    doc = json.loads(out.read_text())
    assert {"command", "quick", "machine", "seconds", "suites", "targets"} <= doc.keys()
    assert doc["quick"] is True and doc["machine"]["cores"] >= 1
    (row,) = doc["suites"]["throughput"]
    assert row["config"] == "ftmpi Horovod, 1 server"
    for key in (
        "params",
        "workers",
        "servers",
        "oversubscribed",
        "samples_per_s",
        "forward_ms",
        "backward_ms",
        "step_ms",
        "push_pull_broadcast_ms",
        "server_apply_ms",
        "worker_peak_rss_mib",
        "server_peak_rss_mib",
    ):
        assert key in row, key
    assert set(doc["targets"]) == {
        "sync_vs_horovod",
        "transfer_vs_p2p",
        "transfer_vs_spawned_p2p",
        "apply_vs_single_core",
    }
    for target in doc["targets"].values():
        assert {"value", "target", "met"} <= target.keys()


def test_limits_measure_point_to_point_in_the_job_and_to_a_spawned_rank():
    probe = [sys.executable, "benchmarks/limits.py", "--nbytes", str(4 << 20)]
    probe += ["--chunk-bytes", str(1 << 20), "--repeats", "1", "--spawned"]
    res = run_command(limits_command(probe), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    (line,) = [x for x in res.stdout.splitlines() if x.startswith("BENCH ")]
    doc = json.loads(line[6:])
    assert doc["nbytes"] == 4 << 20
    for key in ("p2p_bytes_per_s", "spawned_p2p_bytes_per_s"):
        assert set(doc[key]) == {"unchunked", "chunked_1048576"}, key
        assert all(rate > 0 for rate in doc[key].values()), doc
