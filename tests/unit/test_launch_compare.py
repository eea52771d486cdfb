"""``ftmpi-run diff`` names exactly what changed; ``ftmpi-run replay`` plans the recorded run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ftmpi.config import Config
from ftmpi.manifest import FORMAT_VERSION, build_manifest, write_json_atomic
from launch import cli
from launch.compare import field_differences, first_divergence, load_run
from launch.replay import plan_replay, timed_kills

TRAINER = {"lr": 0.01, "steps": 40, "data": "synthetic:512"}


def make_run(
    run_dir: Path, script: Path, *, trainer=None, metrics=(), weights="w0", **config
) -> Path:
    """A run directory with a real manifest of ``script`` (as the trainer writes it)."""
    cfg = Config(run_dir=str(run_dir), run_id=run_dir.name, **config)
    doc = build_manifest(
        cfg,
        run_id=run_dir.name,
        num_workers=2,
        num_servers=1,
        backend="mpi",
        script=str(script),
        data={"sha256": "d0"},
        extra={"trainer": {**TRAINER, **(trainer or {}), "run_dir": str(run_dir)}},
    )
    doc["argv"] = [str(script), "--run-dir", str(run_dir)]
    doc["outcome"] = {"weights_sha256": weights, "final_test_accuracy": 0.5}
    write_json_atomic(run_dir / "manifest.json", doc)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return run_dir


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train.py"
    path.write_text("print('training')\n")
    return path


def test_identical_runs_differ_in_nothing(tmp_path, script):
    a = load_run(str(make_run(tmp_path / "a", script)))
    b = load_run(str(make_run(tmp_path / "b", script)))
    assert field_differences(a, b) == []


def test_one_hyper_parameter_is_named_exactly(tmp_path, script):
    a = load_run(str(make_run(tmp_path / "a", script)))
    b = load_run(str(make_run(tmp_path / "b", script, trainer={"lr": 0.02})))
    assert field_differences(a, b) == [("trainer.lr", 0.01, 0.02)]
    c = load_run(str(make_run(tmp_path / "c", script, checkpoint_every=7)))
    assert field_differences(a, c) == [("config.checkpoint_every", 100, 7)]


def test_one_byte_of_the_script_is_named_exactly(tmp_path, script):
    a = load_run(str(make_run(tmp_path / "a", script)))
    script.write_text("print('trainine')\n")
    b = load_run(str(make_run(tmp_path / "b", script)))
    assert [d[0] for d in field_differences(a, b)] == ["script.sha256"]


def test_diff_command_reports_fields_results_and_divergence(tmp_path, script, capsys):
    rows = [{"step": 10, "loss": 1.0, "test_accuracy": 0.5}]
    a = make_run(tmp_path / "a", script, metrics=[*rows, {"step": 20, "loss": 0.95}])
    b = make_run(
        tmp_path / "b", script, trainer={"lr": 0.5}, weights="w1", metrics=[*rows, {"step": 20}]
    )
    same = make_run(tmp_path / "same", script, metrics=rows)
    assert first_divergence(load_run(str(a)), load_run(str(same))) is None
    assert cli.main(["diff", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "trainer.lr: 0.01 -> 0.5" in out and "manifest fields that differ (1)" in out
    assert "final weights: differ" in out
    assert "metrics first diverge at step 20: loss 0.95 (A) vs None (B)" in out


def test_diff_refuses_a_manifest_of_a_newer_format(tmp_path, script):
    a = make_run(tmp_path / "a", script)
    newer = tmp_path / "newer"
    write_json_atomic(newer / "manifest.json", {"format_version": FORMAT_VERSION + 1})
    with pytest.raises(SystemExit, match=f"format_version={FORMAT_VERSION + 1} is newer"):
        cli.main(["diff", str(a), str(newer)])
    with pytest.raises(SystemExit, match=r"holds no manifest\.json"):
        cli.main(["diff", str(a), str(tmp_path)])


def test_replay_plan_from_launcher_json_reruns_the_invocation_in_a_new_directory(tmp_path, script):
    run = make_run(tmp_path / "a", script, kill="server:0@step=5")
    argv = ["-np", "2", "--run-dir", str(run), "--kill", "server:0@step=5", "--"]
    argv += [sys.executable, str(script), "--out", str(run)]
    invocation = {
        "argv": argv,
        "cwd": str(tmp_path),
        "environ": {"FTMPI_SEED": "3", "FTMPI_RUN_ID": "old", "FTMPI_RESUME": "1"},
    }
    write_json_atomic(run / "launcher.json", {"invocation": invocation})
    plan = plan_replay(load_run(str(run)), str(tmp_path / "new"))
    new = str(tmp_path / "new")
    assert plan.source == "launcher.json" and plan.cwd == str(tmp_path)
    assert plan.argv[:2] == ["--run-dir", new] and str(run) not in plan.argv
    assert plan.argv[-2:] == ["--out", new]
    assert plan.env == {"FTMPI_SEED": "3"}
    assert timed_kills(plan) == []


def test_replay_plan_from_the_manifest_alone(tmp_path, script):
    run = make_run(tmp_path / "a", script, kill="server:0@3s")
    plan = plan_replay(load_run(str(run)), str(tmp_path / "new"))
    assert plan.source == "manifest.json"
    assert plan.argv[:4] == ["-np", "2", "--servers", "1"]
    assert plan.argv[-3:] == [str(script), "--run-dir", str(tmp_path / "new")]
    assert plan.env["FTMPI_KILL"] == "server:0@3s" and timed_kills(plan) == ["server:0@3s"]
