"""The experiment grid and its table derivations on synthetic runs (no MPI)."""

from __future__ import annotations

import argparse
import json

import pytest

from launch import experiment, figures, results
from launch.results import Step

T0 = 1_000_000.0


def kill(t: float, pid: int = 7, source: str = "rank") -> dict:
    return {"event": "kill", "time": t, "pid": pid, "spec": "server:0@30s", "source": source}


def ev(name: str, t: float, **fields) -> dict:
    return {"event": name, "time": t, "pid": 1, **fields}


def steady_steps(start: float, n: int, dt: float = 0.1, first: int = 0) -> list[Step]:
    return [Step(first + i, start + i * dt, start + (i + 1) * dt) for i in range(n)]


def test_failure_band_runs_from_kill_to_first_replacement_ready():
    log = [
        kill(T0 + 30),
        kill(T0 + 30, source="launcher"),  # the same kill, logged twice
        ev("failure_detected", T0 + 31),
        ev("replacement_ready", T0 + 52),
        ev("replacement_ready", T0 + 52.1),  # another rank's record of the same recovery
        kill(T0 + 80, pid=8),
    ]
    assert results.recoveries(log) == [(T0 + 30, T0 + 52), (T0 + 80, None)]
    assert results.failure_bands(log, end=T0 + 200) == [(T0 + 30, T0 + 52), (T0 + 80, T0 + 200)]


def test_idle_seconds_count_only_the_excess_of_steps_overlapping_a_band():
    steps = steady_steps(T0, 100)  # 10 s of 0.1 s steps
    # a step blocked for 20 s by a kill at T0 + 10.05, then training goes on
    steps.append(Step(100, T0 + 10.0, T0 + 30.0))
    steps += steady_steps(T0 + 30.0, 50, first=101)
    # a slow step outside any band (an evaluation or a snapshot write) is not idle time
    steps.append(Step(151, T0 + 35.0, T0 + 37.0))
    bands = [(T0 + 10.05, T0 + 29.0)]
    assert results.idle_seconds(steps, bands) == pytest.approx(19.9)
    assert results.idle_seconds(steps, []) == 0.0
    assert results.idle_seconds([], bands) == 0.0


def test_idle_seconds_include_a_wait_between_logged_steps():
    # the step running at the kill was abandoned by a rollback (never logged): its wait falls
    # between the last step before the kill and the first one after the recovery
    steps = steady_steps(T0, 100) + steady_steps(T0 + 25.0, 100, first=90)
    assert results.idle_seconds(steps, [(T0 + 10.0, T0 + 24.0)]) == pytest.approx(15.0)


def test_idle_seconds_of_a_worker_that_keeps_computing_are_near_zero():
    steps = steady_steps(T0, 300)  # stateless: steady steps straight through the band
    assert results.idle_seconds(steps, [(T0 + 5, T0 + 25)]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("steps_run", "workers", "mode", "versions", "lost"),
    [
        (1000, 1, "sync", [1000], 0),  # no failure
        (1080, 1, "sync", [1000], 80),  # a rollback redid 80 steps
        (1000, 1, "sync", [960, 1000], 40),  # chain-next: the slowest shard lost 40
        (500, 2, "async", [990], 10),  # async: every worker's push is an update
        (1000, 1, "sync", [1000, 1002], 0),  # never negative
        (1000, 1, "sync", [], None),  # no versions recorded: unknown
    ],
)
def test_updates_lost(steps_run, workers, mode, versions, lost):
    assert results.updates_lost(steps_run, workers, mode, versions) == lost


def test_time_to_target_is_the_first_evaluation_at_or_above_it():
    records = [
        {"wall_time": 1.0, "test_accuracy": 0.5},
        {"wall_time": 2.0, "test_accuracy": 0.8},
        {"wall_time": 3.0, "test_accuracy": 0.7},
        {"wall_time": 4.0, "test_accuracy": 0.9},
    ]
    assert results.time_to_target(records, 0.8) == 2.0
    assert results.time_to_target(records, 0.85) == 4.0
    assert results.time_to_target(records, 0.95) is None


def test_resource_summary_per_process():
    samples = [
        {"pid": 1, "time": 1.0, "cpu_percent": 50.0, "rss_bytes": 10, "role": "starting"},
        {"pid": 1, "time": 2.0, "cpu_percent": 100.0, "rss_bytes": 30, "role": "worker"},
        {"pid": 2, "time": 2.0, "cpu_percent": 20.0, "rss_bytes": 5, "role": "server 0"},
    ]
    out = results.resource_summary(samples)
    assert out[1] == {"role": "worker", "cpu_percent": 75.0, "peak_rss_bytes": 30}
    assert out[2]["role"] == "server 0"


def write_run(tmp_path, name: str, kills: int) -> str:
    """A synthetic cell run directory: one kill at paper time 10 s, recovered at 20 s."""
    run_dir = tmp_path / name
    (run_dir / "resources").mkdir(parents=True)
    cell = {"name": name, "strategy": "checkpoint", "mode": "sync", "kills": kills}
    cell |= {"job_start": T0 - 20, "clock_zero": T0, "sample_every": 1.0, "status": "ok"}
    (run_dir / "cell.json").write_text(json.dumps(cell))
    summary = {"final_test_accuracy": 0.9, "steps": 300, "steps_per_second": 10.0, "workers": 1}
    summary |= {"mode": "sync", "versions": [300], "gradients_computed": 320}
    summary |= {"metrics_origin": T0 + 0.5}  # the metrics clock starts before training
    (run_dir / "summary.json").write_text(json.dumps(summary))
    rows = [
        {"wall_time": float(t), "test_accuracy": t / 40, "versions": [10 * t], "computed": 10 * t}
        for t in range(1, 37)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = steady_steps(T0 + 1, 100) + steady_steps(T0 + 21, 220, first=80)
    lines = ["step,start,end"] + [f"{s.step},{s.start},{s.end}" for s in steps]
    (run_dir / "steps.csv").write_text("\n".join(lines) + "\n")
    if kills:
        log = [kill(T0 + 10), ev("replacement_ready", T0 + 20), ev("rollback", T0 + 20.5)]
        (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    res = "time,cpu_percent,rss_bytes,role\n" + "".join(
        f"{T0 + t},{50 + t},{2**20 * (100 + t)},worker\n" for t in range(30)
    )
    (run_dir / "resources" / "rank-11.csv").write_text(res + "torn,line")
    return str(run_dir)


def test_row_and_figures_of_a_synthetic_run(tmp_path):
    run = results.load_run(write_run(tmp_path, "checkpoint-sync-k1", kills=1))
    row = results.row(run, target=0.5)
    assert tuple(row) == results.COLUMNS
    assert row["updates_lost"] == 20  # 320 steps run, 300 in the final model
    assert row["time_to_target_s"] == 19.5  # from the first training step
    assert row["late_start_s"] == 1.0
    assert row["recoveries"] == 1
    assert row["worker_peak_rss_mb"] == 129.0
    assert row["server_cpu_pct"] is None  # no server samples
    data = figures.figure_data("accuracy", [run])
    (series,) = data["panels"]["checkpoint (sync)"]
    assert series["bands"] == [[10.0, 20.0]]
    assert series["x"][0] == 1.5 and series["y"][0] == 1 / 40  # on the paper clock
    paths = figures.write_figures([run], str(tmp_path / "fig"), "test")
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_markdown_table_escapes_and_blanks():
    rows = [{"a": None, "b": "x|y", "c": 0.12345}]
    assert results.markdown_table(rows, ("a", "b", "c")).splitlines()[2] == "| - | x\\|y | 0.1235 |"


def test_paper_grid_follows_the_papers_schedule():
    schedule = experiment.Schedule.paper(0.5, offset=10)
    assert schedule == experiment.Schedule(run=100.0, kills=(25.0, 50.0), down_for=10.0)
    cells = {c.name: c for c in experiment.paper_grid(schedule)}
    assert len(cells) == 19 and cells["none-sync-k0"].kill_specs == []
    assert cells["chain-async-k2"].kill_specs == ["head:0@25s", "head:0@50s"]
    assert cells["checkpoint-sync-k1"].kill_specs == ["server:0@25s"]
    chain = cells["chain-sync-k1"]
    assert chain.options == {
        "servers": 3,
        "chain_length": 3,
        "chain_ack": "next",
        "replicate_every": 100,
        "down_for": 10.0,
    }
    assert "--chain-ack=next" in chain.launch_args()


def test_only_filter_and_its_error():
    cells = experiment.paper_grid(experiment.Schedule.paper(1, 0))
    chosen = experiment.select(cells, "stateless-*-k1,none-*")
    assert [c.name for c in chosen] == ["none-sync-k0", "stateless-sync-k1"]
    with pytest.raises(ValueError, match="matches no cell; cells: none-sync-k0"):
        experiment.select(cells, "nothing*")


def test_out_dir_is_refused_when_not_empty_unless_resuming(tmp_path):
    experiment.check_out_dir(str(tmp_path / "new"), resume=False)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.csv").write_text("x")
    with pytest.raises(ValueError, match="--resume"):
        experiment.check_out_dir(str(tmp_path / "old"), resume=False)
    experiment.check_out_dir(str(tmp_path / "old"), resume=True)


def test_bad_options_stop_before_any_job(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"--time-scale 0\.0 must be positive"):
        experiment.main(["paper", "--time-scale", "0", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"--trainer nope\.py is not a file"):
        experiment.main(["paper", "--trainer", "nope.py", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_a_refused_configuration_is_recorded_as_not_supported(tmp_path):
    cell = experiment.Cell("x", "chain", "sync", 0, {"servers": 2, "chain_length": 3})
    args = argparse.Namespace(workers=1)
    schedule = experiment.Schedule.paper(0.1, 0)
    msg = experiment.refusal(cell, args, schedule, str(tmp_path))
    assert msg is not None and "multiple of 3 servers" in msg
