"""The launcher without MPI: dry-run command lines, fail-fast validation, the restart loop (with
a stand-in job) and the summary subcommand."""

from __future__ import annotations

import json
import os
import sys

import pytest

from launch import cli
from launch.restart import LaunchReport, run_with_restarts
from launch.summary import summarize

BASE = {"PATH": os.environ.get("PATH", "")}


def dry_run(capsys, *argv: str, environ=None) -> list[str]:
    assert cli.launch(["--dry-run", *argv], environ={**BASE, **(environ or {})}) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("ftmpi-run: ")
    return line.removeprefix("ftmpi-run: ").split(" ")


def test_every_flag_becomes_its_ftmpi_variable(capsys, tmp_path):
    argv = dry_run(
        capsys,
        *("-np", "2", "--servers", "3", "--strategy", "chain", "--chain-length", "3"),
        *("--chain-ack", "next", "--replicate-every", "4", "--mode", "async"),
        *("--stale-policy", "mean", "--max-staleness", "5", "--respawn-workers"),
        *("--down-for", "1.5", "--checkpoint-every", "7", "--checkpoint-dir", "ck"),
        *("--async-checkpoint", "--seed", "9", "--timeout", "60", "--resume"),
        *("--run-dir", str(tmp_path), "--kill", "head:0@step=3", "--kill", "worker:1@2s"),
        *("--mpirun", sys.executable, "--", "python", "t.py"),
        environ={"FTMPI_RUN_ID": "rid"},
    )
    assert argv[:3] == [sys.executable, "--with-ft", "ulfm"]
    assert argv[-2:] == ["python", "t.py"]
    exported = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "-x")
    start = exported.pop("FTMPI_JOB_START")
    assert float(start) > 0
    assert exported == {
        "FTMPI_SERVERS": "3",
        "FTMPI_STRATEGY": "chain",
        "FTMPI_CHAIN_LENGTH": "3",
        "FTMPI_CHAIN_ACK": "next",
        "FTMPI_REPLICATE_EVERY": "4",
        "FTMPI_MODE": "async",
        "FTMPI_STALE_POLICY": "mean",
        "FTMPI_MAX_STALENESS": "5",
        "FTMPI_RESPAWN_WORKERS": "1",
        "FTMPI_DOWN_FOR": "1.5",
        "FTMPI_CHECKPOINT_EVERY": "7",
        "FTMPI_CHECKPOINT_DIR": "ck",
        "FTMPI_ASYNC_CHECKPOINT": "1",
        "FTMPI_SEED": "9",
        "FTMPI_TIMEOUT": "60.0",
        "FTMPI_RESUME": "1",
        "FTMPI_RUN_ID": "rid",
        "FTMPI_RUN_DIR": str(tmp_path),
        "FTMPI_KILL": "head:0@step=3,worker:1@2s",
    }
    assert "-np" in argv and argv[argv.index("-np") + 1] == "5"


def test_defaults_come_from_the_callers_environment(capsys):
    argv = dry_run(
        capsys,
        "--mpirun",
        sys.executable,
        "--",
        "python",
        "t.py",
        environ={"FTMPI_SERVERS": "2", "FTMPI_WORKERS": "3", "FTMPI_KILL": "server:1@step=4"},
    )
    assert argv[argv.index("-np") + 1] == "5"
    assert "FTMPI_KILL=server:1@step=4" in argv
    assert any(a.startswith("FTMPI_RUN_DIR=runs/") for a in argv)


def test_srun_and_mpiexec_dry_runs(capsys):
    argv = dry_run(capsys, "--launcher", "srun", "--mpirun", sys.executable, "--", "t")
    assert argv[:4] == [sys.executable, "--mpi=pmix", "-n", "3"]
    assert argv[4].startswith("--export=ALL,FTMPI_JOB_START=")
    argv = dry_run(capsys, "--launcher", "mpiexec", "--mpirun", sys.executable, "--", "t")
    assert argv == [sys.executable, "-n", "3", "t"]


def test_random_kills_are_printed_for_replay(capsys):
    cli.launch(
        [
            *("--random-kills", "2", "--seed", "4", "--steps", "30", "--servers", "2"),
            *("--mpirun", sys.executable, "--dry-run", "--", "t"),
        ],
        environ=BASE,
    )
    out = capsys.readouterr().out
    replay = out.split("replay with: ")[1].splitlines()[0]
    kill = next(a for a in out.split() if a.startswith("FTMPI_KILL="))
    assert kill.removeprefix("FTMPI_KILL=") == ",".join(replay.split(" ")[1::2])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--"], "no command given"),
        (["-np", "0", "--", "t"], "-np 0: at least one worker rank"),
        (["--servers", "-1", "--", "t"], "servers=-1 is negative"),
        (["--down-for", "-2", "--", "t"], "down_for=-2.0 is negative"),
        (["--strategy", "chain", "--servers", "2", "--", "t"], "needs a multiple of 3 servers"),
        (["--kill", "disk@step=3", "--", "t"], "--kill disk@step=3: kill spec"),
        (["--kill", "server:1@step=3", "--", "t"], "there are 1 server rank(s)"),
        (["--kill", "tail:1@step=3", "--servers", "2", "--", "t"], "end at"),
        (["--kill", "worker:0@step=50", "--steps", "50", "--", "t"], "not before the run's end"),
        (["--kill", "server@9s", "--duration", "5", "--", "t"], "9s is not before"),
        (["--random-kills", "1", "--", "t"], "needs the run's length"),
        (["--max-restarts", "-1", "--", "t"], "--max-restarts -1 is negative"),
        (["--steps", "0", "--", "t"], "--steps 0 must be positive"),
        (["--launcher", "srun", "--hostfile", "h", "--", "t"], "srun takes no hostfile"),
        (["--mpirun", "/nonexistent/mpirun", "--", "t"], "is not an executable file"),
    ],
)
def test_bad_input_fails_before_launching(argv, message):
    if "tail:1@step=3" in argv:
        argv = [*argv[:-2], "--steps", "3", "--", "t"]  # tail:1 exists with 2 servers
    with pytest.raises(SystemExit) as info:
        cli.launch(argv, environ=BASE)
    assert str(info.value).startswith("ftmpi-run: ")
    assert message in str(info.value)


def test_a_finished_run_directory_is_refused(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(SystemExit, match="already holds a finished run"):
        cli.launch(["--run-dir", str(tmp_path), "--mpirun", sys.executable, "--", "t"], BASE)


# A stand-in job: the first attempt reports an injected kill and fails; a resumed one succeeds.
FAKE_JOB = """
import os, sys, json
print(json.dumps({k: v for k, v in os.environ.items() if k.startswith("FTMPI_")}), flush=True)
if os.environ.get("FTMPI_RESUME") != "1":
    print("ftmpi: injected failure: server:0@step=3 (pid 1)", file=sys.stderr, flush=True)
    sys.exit(5)
with open(os.path.join(os.environ["FTMPI_RUN_DIR"], "summary.json"), "w") as f:
    json.dump({"run_id": "rid", "finished": True}, f)
"""


def test_restart_loop_resumes_without_repeating_fired_kills(tmp_path, capfd):
    from ftmpi.faults import parse_schedule

    report = LaunchReport("rid", str(tmp_path), 2, "server:0@step=3,worker:1@step=9", None)
    env = {"FTMPI_RUN_ID": "rid", "FTMPI_RUN_DIR": str(tmp_path)}
    run_with_restarts(
        lambda e: [sys.executable, "-c", FAKE_JOB],
        env,
        report,
        schedule=parse_schedule(report.schedule),
        job_start=0.0,
        process_env=lambda e: {**BASE, **e},
    )
    seen = [json.loads(line) for line in capfd.readouterr().out.splitlines() if line[:1] == "{"]
    assert [s.get("FTMPI_RESUME") for s in seen] == [None, "1"]
    assert [s["FTMPI_KILL"] for s in seen] == ["server:0@step=3,worker:1@step=9", "worker:1@step=9"]
    assert {s["FTMPI_RUN_ID"] for s in seen} == {"rid"}
    assert report.restarts == 1 and report.returncode == 0
    record = json.loads((tmp_path / "launcher.json").read_text())
    assert record["restarts"] == 1 and record["returncode"] == 0
    assert [a["returncode"] for a in record["attempts"]] == [5, 0]
    assert record["attempts"][1]["lost_seconds"] >= 0 and record["lost_seconds"] >= 0
    assert "first output" in record["lost_time_definition"]
    assert "after 1 restart(s)" in report.final_line()


def _run_code(report: LaunchReport, code: str) -> None:
    """Run ``python -c CODE`` as the job, without kills, under ``run_with_restarts``."""
    run_with_restarts(
        lambda e: [sys.executable, "-c", code],
        {},
        report,
        schedule=[],
        job_start=0.0,
        process_env=lambda e: {**BASE, **e},
    )


def test_restart_loop_gives_up_after_max_restarts(tmp_path):
    report = LaunchReport("rid", str(tmp_path), 1, "", None)
    _run_code(report, "import sys; sys.exit(3)")
    assert report.restarts == 1 and report.returncode == 3
    assert "before training finished" in report.final_line()


def test_a_job_that_exits_0_without_finishing_training_is_a_failure(tmp_path, capfd):
    report = LaunchReport("rid", str(tmp_path), 0, "", None)
    _run_code(report, "print('bye')")
    out = capfd.readouterr().out
    assert report.returncode == 3 and report.attempts[0].returncode == 0
    assert "mpirun exited with status 0, but the job ended" in out
    assert json.loads((tmp_path / "launcher.json").read_text())["finished"] is False


def test_a_finished_job_that_exits_non_zero_is_a_success_and_said_so(tmp_path, capfd):
    job = (
        "import json, os, sys\n"
        f"json.dump({{'finished': True}}, open({str(tmp_path / 'summary.json')!r}, 'w'))\n"
        "sys.exit(137)"
    )
    report = LaunchReport("rid", str(tmp_path), 2, "", None)
    _run_code(report, job)
    assert report.returncode == 0 and report.restarts == 0
    assert "mpirun exited with status 137, but every worker finished" in capfd.readouterr().out


def test_a_resume_appends_to_the_launcher_record(tmp_path):
    for _ in range(2):
        report = LaunchReport("rid", str(tmp_path), 0, "", None)
        report.load_earlier()
        _run_code(report, "import sys; sys.exit(3)")
    record = json.loads((tmp_path / "launcher.json").read_text())
    assert [a["number"] for a in record["earlier_attempts"]] == [0]
    assert [a["number"] for a in record["attempts"]] == [1]


def test_the_resume_command_names_the_run_directory():
    from launch.cli import resume_command

    argv = ["-np", "2", "--steps", "9", "--", "python", "t.py", "--resume"]
    assert resume_command(argv, ["python", "t.py", "--resume"], "runs/x") == (
        "ftmpi-run -np 2 --steps 9 --resume --run-dir runs/x -- python t.py --resume"
    )
    assert resume_command(["-np", "2", "python", "t.py"], ["python", "t.py"], "r") == (
        "ftmpi-run -np 2 --resume --run-dir r python t.py"
    )


def test_summary_subcommand_prints_results_config_restarts_and_events(tmp_path, capsys):
    (tmp_path / "summary.json").write_text(json.dumps({"run_id": "r1", "steps": 40}))
    manifest = {"config": {"strategy": "checkpoint", "servers": 1, "timeout": 300.0}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    launcher = {"restarts": 1, "lost_seconds": 2.5, "returncode": 0, "kill_schedule": "x"}
    launcher["attempts"] = [
        {"number": 0, "returncode": 1, "wall_seconds": 3.0, "injected": ["k"]},
        {"number": 1, "returncode": 0, "wall_seconds": 4.0, "injected": []},
    ]
    (tmp_path / "launcher.json").write_text(json.dumps(launcher))
    events = ["kill", "failure_detected", "failure_detected", "replacement_ready"]
    (tmp_path / "events.jsonl").write_text(
        "".join(
            json.dumps({"time": i, "event": e, "spec": "server:0@step=2"}) + "\n"
            for i, e in enumerate(events)
        )
    )
    assert cli.main(["summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"run r1 ({tmp_path})")
    for expected in ("steps", "strategy", "checkpoint", "restarts", "2.5", "status 1 in 3.0 s"):
        assert expected in out
    assert "timeout" not in out  # defaults are left out
    rows = dict(
        line.split(None, 1)
        for line in out.splitlines()
        if line.startswith("  ") and line.split(None, 1)[0] in ("kills", "detections", "recoveries")
    )
    assert rows == {"kills": "1", "detections": "2", "recoveries": "2"}


def test_summary_of_an_empty_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no run"):
        summarize(str(tmp_path))
    with pytest.raises(SystemExit, match="is not a directory"):
        cli.main(["summary", str(tmp_path / "missing")])
