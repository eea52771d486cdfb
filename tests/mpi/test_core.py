"""The core data path under mpirun: bit-exact sync mode, async convergence, shard coverage,
bad arguments, clean server exit."""

from __future__ import annotations

import json

import pytest

from tests.conftest import PROGS, ROOT

pytestmark = pytest.mark.mpi

TRAINER = str(ROOT / "examples" / "paper_trainer.py")


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_sync_is_bit_exact_with_single_process_reference(mpi, optimizer):
    # W=2 workers, S=2 servers; a StepLR scheduler changes the LR every 3 steps.
    res = mpi(4, [str(PROGS / "bitexact.py"), optimizer, "8"], env={"FTMPI_SERVERS": "2"})
    assert res.returncode == 0, res.stderr
    (report,) = res.json_lines()
    assert report["mismatched"] == [], report
    assert report["max_abs_diff"] == 0.0
    assert report["applied"] == [8, 8]


def test_shards_cover_every_parameter_exactly_once(mpi):
    res = mpi(4, [str(PROGS / "bitexact.py"), "sgd", "1"], env={"FTMPI_SERVERS": "2"})
    assert res.returncode == 0, res.stderr
    (report,) = res.json_lines()
    names = [n for shard in report["shards"] for n in shard]
    expected = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert sorted(names) == sorted(expected)
    assert all(report["shards"]), "a server was given no parameters"


def test_async_converges_on_digits(mpi, tmp_path):
    res = mpi(
        3,
        [
            TRAINER,
            "--steps",
            "300",
            "--eval-every",
            "100",
            "--no-progress",
            "--run-dir",
            str(tmp_path),
        ],
        env={"FTMPI_SERVERS": "1", "FTMPI_MODE": "async"},
        timeout=240,
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "async"
    assert summary["final_test_accuracy"] > 0.9, summary
    # both workers' gradients were applied: 300 steps x 2 workers
    assert summary["applied"] == [600]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [100, 200, 300]
    assert all("staleness_max" in r for r in records)


def test_sync_trainer_matches_plain_data_parallel(mpi, tmp_path):
    """Same data, same seed: one server gives the same model as no server at all."""
    results = {}
    for servers in (0, 1):
        run_dir = tmp_path / f"s{servers}"
        res = mpi(
            2 + servers,
            [
                TRAINER,
                "--data",
                "synthetic:512",
                "--steps",
                "30",
                "--eval-every",
                "10",
                "--no-progress",
                "--run-dir",
                str(run_dir),
            ],
            env={"FTMPI_SERVERS": str(servers)},
            timeout=180,
        )
        assert res.returncode == 0, res.stderr
        results[servers] = [
            json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
        ]
    strip = [{k: r[k] for k in ("step", "loss", "test_accuracy")} for r in results[0]]
    assert strip == [{k: r[k] for k in ("step", "loss", "test_accuracy")} for r in results[1]]
    assert results[1][-1]["applied"] == [30]


@pytest.mark.parametrize(
    ("np_", "env", "message"),
    [
        (2, {"FTMPI_SERVERS": "2"}, "servers=2 leaves 0 worker rank(s) in a world of 2"),
        (2, {"FTMPI_SERVERS": "3"}, "servers=3 leaves 0 worker rank(s) in a world of 2"),
        (2, {"FTMPI_MODE": "bulk"}, "mode='bulk' is not one of ['sync', 'async']"),
        (2, {"FTMPI_SERVERS": "one"}, "FTMPI_SERVERS'one' is not a valid int"),
    ],
)
def test_bad_init_arguments_fail_clearly(mpi, env, np_, message):
    res = mpi(np_, ["-c", "import ftmpi; ftmpi.init(); print('UNREACHABLE')"], env=env, timeout=60)
    assert res.returncode != 0
    assert message in res.stderr
    assert "UNREACHABLE" not in res.stdout


def test_servers_exit_cleanly_when_workers_finish(mpi):
    code = (
        "import ftmpi, sys; rt = ftmpi.init(); "
        "print('worker', ftmpi.rank(), ftmpi.size(), rt.world_rank, flush=True)"
    )
    res = mpi(3, ["-c", code], env={"FTMPI_SERVERS": "1"}, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = sorted(x for x in res.stdout.splitlines() if x.startswith("worker"))
    # only the two workers run user code after init(); the server rank (2) exited inside it
    assert lines == ["worker 0 2 0", "worker 1 2 1"]
