"""The run record: failures counted per event (not per rank), kills from outside the job,
``summary.json``'s ``finished`` in ``is_finished`` and ``ftmpi-run summary``, trainer fields."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ftmpi import record
from ftmpi.events import read_events
from ftmpi.manifest import named_sha256, weights_sha256
from ftmpi.record import Report, count_failures
from launch import cli
from launch.rundir import is_finished
from launch.summary import split_by_attempt

pytestmark = pytest.mark.timeout(60)

RANKS = ("worker 0", "worker 1", "worker 2", "server 0")


def write_events(run_dir, events):
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def server_kill_survived(t0=100.0, pid=4242):
    """One injected server kill as a job of 3 workers and 1 server logs it: the dying rank's
    kill event and the launcher's, then every rank's detection, view change and recovery."""
    events = [
        {"time": t0, "event": "kill", "spec": "server:0@step=5", "pid": pid, "source": "rank"},
        {"time": t0 + 0.1, "event": "kill", "spec": "server:0@step=5", "pid": pid,
         "source": "launcher"},
    ]  # fmt: skip
    for i, role in enumerate(RANKS[:3]):
        events.append({"time": t0 + 1 + i / 10, "event": "failure_detected", "role": role,
                       "view": 0})  # fmt: skip
        events.append({"time": t0 + 2 + i / 10, "event": "view_change", "role": role, "view": 1,
                       "failed_workers": [], "failed_servers": [0]})  # fmt: skip
    for i, role in enumerate(RANKS):  # the replacement server logs it too
        events.append({"time": t0 + 3 + i / 10, "event": "replacement_ready", "role": role,
                       "view": 2})  # fmt: skip
    return events


def test_one_failure_logged_by_four_ranks_counts_once(tmp_path, capsys):
    write_events(tmp_path, server_kill_survived())
    got = count_failures(read_events(str(tmp_path)))
    assert got["view_changes"] == 1 and got["failed_servers"] == 1 and got["failed_workers"] == 0
    assert got["detections"] == 1 and got["recoveries"] == 1 and got["kills"] == 1
    assert [(k["spec"], k["source"]) for k in got["killed"]] == [("server:0@step=5", "injected")]
    assert cli.main(["summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert [_row(out, n) for n in ("kills", "detections", "recoveries")] == ["1", "1", "1"], out
    assert "kills from outside" not in out
    assert "status: not finished (no summary.json)" in out


def _row(out: str, name: str) -> str:
    for line in out.splitlines():
        if line.strip().startswith(name + " "):
            return line.split()[-1]
    raise AssertionError(f"no row {name!r} in:\n{out}")


def test_a_view_change_no_kill_explains_is_a_kill_from_outside(tmp_path, capsys):
    events = [
        {"time": 10.0 + i, "event": "view_change", "role": role, "view": 1,
         "failed_workers": [1], "failed_servers": []}
        for i, role in enumerate(("worker 0", "server 0"))
    ]  # fmt: skip
    write_events(tmp_path, events)
    got = count_failures(read_events(str(tmp_path)))
    assert got["kills"] == 1 and got["view_changes"] == 1 and got["recoveries"] == 0
    assert got["killed"] == [
        {"role": "worker", "index": 1, "view": 1, "time": 10.0, "source": "outside"}
    ]
    assert cli.main(["summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert _row(out, "kills") == "1" and _row(out, "kills from outside") == "1", out


def test_an_injected_server_kill_does_not_explain_a_worker_killed_from_outside():
    events = server_kill_survived()
    for e in events:
        if e["event"] == "view_change":
            e["failed_workers"] = [2]  # worker 2 died in the same view change, with no kill event
    got = count_failures(events)
    assert got["kills"] == 2
    assert sorted(k["source"] for k in got["killed"]) == ["injected", "outside"]
    assert [k["index"] for k in got["killed"] if k["source"] == "outside"] == [2]


def test_a_kill_logged_after_the_view_change_it_caused_explains_it_only_within_the_slack():
    late = record.KILL_SLACK_S + 1
    events = [
        {"time": 1.0, "event": "view_change", "view": 1, "failed_workers": [1]},
        {"time": 1.0 + late, "event": "kill", "spec": "worker:1@step=3", "pid": 7},
    ]
    assert [k["source"] for k in count_failures(events)["killed"]] == ["outside", "injected"]
    events[1]["time"] = 1.5
    assert [k["source"] for k in count_failures(events)["killed"]] == ["injected"]


def test_relaunched_jobs_count_their_views_separately(tmp_path, capsys):
    first, second = server_kill_survived(100.0, pid=1), server_kill_survived(500.0, pid=2)
    write_events(tmp_path, first + second)
    starts = [99.0, 400.0]
    jobs = split_by_attempt(read_events(str(tmp_path)), starts)
    assert [len(j) for j in jobs] == [len(first), len(second)]
    launcher = {"restarts": 1, "attempts": [
        {"number": n, "started": s, "returncode": 0, "wall_seconds": 1.0}
        for n, s in enumerate(starts)
    ]}  # fmt: skip
    (tmp_path / "launcher.json").write_text(json.dumps(launcher))
    assert cli.main(["summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert _row(out, "kills") == "2" and _row(out, "detections") == "2", out
    assert _row(out, "recoveries") == "3", out  # one re-spawn per job plus the relaunch


@pytest.mark.parametrize(
    ("text", "finished"),
    [
        (None, False),
        ('{"finished": false, "steps": 3}', False),
        ('{"finished": true}', True),
        ('{"run_id": "old", "steps": 40}', True),  # written before the field existed
        ("{not json", False),
        ("[1]", False),
    ],
)
def test_is_finished_reads_the_summary(tmp_path, text, finished):
    if text is not None:
        (tmp_path / "summary.json").write_text(text)
    assert is_finished(str(tmp_path)) is finished


def test_summary_command_says_not_finished_when_the_summary_says_so(tmp_path, capsys):
    (tmp_path / "summary.json").write_text(json.dumps({"run_id": "r", "finished": False}))
    assert cli.main(["summary", str(tmp_path)]) == 0
    assert "status: not finished (summary.json: finished False)" in capsys.readouterr().out
    (tmp_path / "summary.json").write_text(json.dumps({"run_id": "r", "finished": True}))
    assert cli.main(["summary", str(tmp_path)]) == 0
    assert "status: finished" in capsys.readouterr().out


def test_report_round_trips_through_its_message():
    for report in (Report(True, 30, "ab" * 32), Report(False, None, None), Report(True, 0, None)):
        assert Report.decode(report.encode()) == report


def test_named_hash_of_parameters_equals_the_model_hash_without_buffers():
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert named_sha256(model.named_parameters()) == weights_sha256(model)
    before = weights_sha256(model)
    with torch.no_grad():
        model[0].bias[1] += 1e-3
    assert weights_sha256(model) != before


def test_trainer_fields_join_the_summary_but_not_over_ftmpi_own(monkeypatch):
    monkeypatch.setattr(record, "_summary", {})
    rt = SimpleNamespace(
        run_id="r1",
        num_workers=2,
        num_servers=1,
        backend=SimpleNamespace(name="mpi"),
        config=SimpleNamespace(run_dir="", mode="sync"),
    )
    record.add_summary(final_test_accuracy=0.9, steps=30, finished=True)
    reports = {0: Report(True, 30, "aa" * 32), 1: Report(False, 30, "bb" * 32)}
    doc = record.summary(rt, reports, lost=[], silent=[])
    assert doc["final_test_accuracy"] == 0.9 and doc["steps"] == 30
    assert doc["finished"] is False  # worker 1 did not finish: a trainer cannot say otherwise
    assert doc["workers_agree"] is False and doc["weights_sha256"] == "aa" * 32
    assert doc["backend"] == "mpi" and doc["backend_fallback"] is None
    assert doc["failures"]["kills"] == 0
    ok = record.summary(rt, {0: reports[0], 1: Report(True, 30, "aa" * 32)}, lost=[], silent=[])
    assert ok["finished"] is True and ok["workers_agree"] is True
    lost = record.summary(rt, {0: reports[0]}, lost=[1], silent=[])
    assert lost["finished"] is True and lost["workers_lost"] == [1]  # a dead worker is not live
    silent = record.summary(rt, {0: reports[0]}, lost=[], silent=[1])
    assert silent["finished"] is False and silent["workers_silent"] == [1]


def fake_runtime(run_dir):
    """Worker 0 of 2 workers on n1 and n2 and one server on n2; node n9 spare."""
    from ftmpi.config import Config
    from ftmpi.runtime import Runtime

    rt = Runtime(
        config=Config(run_dir=str(run_dir), run_id="rid", spare_nodes="n9"),
        world=None,
        group=SimpleNamespace(Get_rank=lambda: 0),
        is_server=False,
        workers=[0, 1],
        servers=[2],
        run_id="rid",
        run=0,
        job_start=0.0,
        chains=[[0]],
        nodes=["n1", "n2", "n2"],
    )
    rt.backend = SimpleNamespace(name="mpi")
    return rt


def test_a_trainer_adding_manifest_fields_updates_it_and_a_relaunch_counts_a_restart(
    tmp_path, monkeypatch
):
    from ftmpi import manifest

    monkeypatch.setattr(manifest, "_written", manifest._Written())
    rt = fake_runtime(tmp_path)
    first = manifest.write_manifest(rt)  # what ftmpi.init() does
    assert first is not None and first["script"]["path"] == manifest.main_script()
    rt.nodes = ["n1", "n2", "n3"]  # a later view: the manifest keeps the layout at the start
    added = manifest.write_manifest(rt, str(tmp_path), data={"sha256": "d"}, extra={"trainer": {}})
    doc = manifest.read_manifest(tmp_path / "manifest.json")
    assert doc == added and doc["data"] == {"sha256": "d"} and doc["trainer"] == {}
    assert doc["layout"] == first["layout"]
    assert "restarts" not in doc and doc["started"] == first["started"]
    monkeypatch.setattr(manifest, "_written", manifest._Written())  # a relaunched job
    again = manifest.write_manifest(rt)
    assert again is not None and again["restarts"] == 1 and again["data"] == {}


def test_the_manifest_records_every_ranks_role_and_node_and_the_chains_nodes(tmp_path, monkeypatch):
    from ftmpi import manifest

    monkeypatch.setattr(manifest, "_written", manifest._Written())
    layout = manifest.write_manifest(fake_runtime(tmp_path))["layout"]
    assert layout["ranks"] == [
        {"world_rank": 0, "role": "worker 0", "node": "n1"},
        {"world_rank": 1, "role": "worker 1", "node": "n2"},
        {"world_rank": 2, "role": "server 0", "node": "n2"},
    ]
    assert [w["host"] for w in layout["workers"]] == ["n1", "n2"]
    assert layout["servers"] == [{"server": 0, "world_rank": 2, "host": "n2"}]
    assert (layout["chains"], layout["chain_nodes"]) == ([[0]], [["n2"]])
    assert (layout["hosts"], layout["spare_nodes"]) == (["n1", "n2"], ["n9"])


def test_a_torn_event_line_is_skipped_and_the_rest_read(tmp_path):
    from ftmpi.events import read_events

    whole = {"time": 1.0, "event": "kill", "pid": 7, "spec": "server:0@step=3"}
    (tmp_path / "events.jsonl").write_text(
        json.dumps(whole) + "\n" + '{"time": 2.0, "event": "view_ch' + "\n" + '["x"]\n'
    )
    assert read_events(str(tmp_path)) == [whole]
