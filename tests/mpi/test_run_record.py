"""The run record of a plain Horovod-style script (``examples/horovod_digits_ftmpi.py``: only
``init`` and ``DistributedOptimizer`` from ftmpi): ftmpi writes its ``manifest.json`` and
``summary.json``, and ``ftmpi-run summary``, ``diff`` and ``replay`` work on its run."""

from __future__ import annotations

import json
import sys

import pytest

from launch.compare import field_differences, load_run
from launch.rundir import is_finished
from tests.conftest import ROOT, run_command

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(420)]  # 3 small jobs on 2 cores

FTMPI_RUN = [sys.executable, "-m", "launch.cli"]
SCRIPT = ROOT / "examples" / "horovod_digits_ftmpi.py"
STEPS = 30
BACKEND = "horovod"  # the script imports horovod.torch (through ftmpi.horovod) in any case


def train(run_dir, script):
    """Run ``script`` on 2 workers and 1 server under ftmpi-run; return the line it printed."""
    job = [sys.executable, str(script), "--model", "cnn", "--steps", str(STEPS)]
    res = run_command(
        [*FTMPI_RUN, "-np", "2", "--servers", "1", "--run-dir", str(run_dir), "--", *job],
        env={"FTMPI_BACKEND": BACKEND},
        timeout=120,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    (printed,) = res.json_lines()
    return printed


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("record") / "a"
    return run_dir, train(run_dir, SCRIPT)


def test_a_plain_script_gets_a_manifest_and_a_finished_summary(original):
    run_dir, printed = original
    manifest = json.loads((run_dir / "manifest.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert manifest["script"]["path"] == str(SCRIPT)
    assert manifest["layout"]["backend"] == summary["backend"] == BACKEND
    assert summary["finished"] is True and is_finished(str(run_dir))
    assert summary["steps"] == STEPS and summary["workers"] == 2 and summary["servers"] == 1
    # the script hashes its state_dict (names and bytes, in name order): the same weights
    assert summary["weights_sha256"] == printed["weights_sha256"]
    assert summary["workers_agree"] is True
    assert summary["failures"]["kills"] == 0 and summary["failures"]["view_changes"] == 0
    assert manifest["outcome"]["weights_sha256"] == printed["weights_sha256"]
    assert manifest["outcome"]["finished"] is True and "restarts" not in manifest
    shown = run_command([*FTMPI_RUN, "summary", str(run_dir)], timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "status: finished" in shown.stdout and "not finished" not in shown.stdout


def test_diff_names_a_one_byte_change_of_the_script(original, tmp_path):
    run_dir, printed = original
    text = SCRIPT.read_text()
    assert "Rank 0 prints" in text
    copy = tmp_path / "horovod_digits_ftmpi.py"
    copy.write_text(text.replace("Rank 0 prints", "Rank 0 printz", 1))  # a docstring byte
    changed_dir = tmp_path / "b"
    changed = train(changed_dir, copy)
    assert changed["weights_sha256"] == printed["weights_sha256"]
    res = run_command([*FTMPI_RUN, "diff", str(run_dir), str(changed_dir)], timeout=60)
    assert res.returncode == 0, res.stderr
    keys = [k for k, _, _ in field_differences(load_run(str(run_dir)), load_run(str(changed_dir)))]
    assert "script.sha256" in keys, keys
    # the copy lives elsewhere (its path and argv differ) and outside git; nothing else differs
    assert {k for k in keys if not k.startswith("script.git")} <= {
        "script.sha256",
        "script.path",
        "argv",
    }, keys
    assert f"the training script differs: {SCRIPT} " in res.stdout, res.stdout
    assert f"vs {copy} (sha256 " in res.stdout, res.stdout
    assert "final weights: identical" in res.stdout, res.stdout


def test_replay_of_a_plain_script_run_ends_with_the_same_weights(original, tmp_path):
    run_dir, printed = original
    replay_dir = tmp_path / "replay"
    res = run_command(
        [*FTMPI_RUN, "replay", str(run_dir), "--run-dir", str(replay_dir)], timeout=150
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"final weights hash matches ({printed['weights_sha256']})" in res.stdout
    replayed = json.loads((replay_dir / "summary.json").read_text())
    assert replayed["finished"] is True and replayed["steps"] == STEPS
