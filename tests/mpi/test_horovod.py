"""Horovod drop-in: same weights as plain Horovod, Horovod on workers only, hvd arguments."""

from __future__ import annotations

import json
import sys

import pytest

from ftmpi.events import read_events
from tests.conftest import PROGS, ROOT, run_command

pytestmark = pytest.mark.mpi

PLAIN = str(ROOT / "examples" / "horovod_digits.py")
WITH_FTMPI = str(ROOT / "examples" / "horovod_digits_ftmpi.py")


def test_horovod_is_installed_with_mpi():
    import horovod.torch as hvd

    assert hvd.mpi_built()


def test_example_with_ftmpi_trains_to_the_same_weights_as_plain_horovod(mpi):
    """In both placements: the servers' optimizer step, and the workers' own with a mirror."""
    plain = mpi(2, [PLAIN, "--steps", "40"], timeout=180)
    assert plain.returncode == 0, plain.stderr
    (a,) = plain.json_lines()
    for placement in ("server", "mirror"):
        env = {"FTMPI_SERVERS": "1", "FTMPI_PLACEMENT": placement}
        ours = mpi(3, [WITH_FTMPI, "--steps", "40"], env=env, timeout=180)
        assert ours.returncode == 0, ours.stderr
        (b,) = ours.json_lines()
        assert a["workers"] == b["workers"] == 2
        # Horovod's allreduce of two ranks is a single addition: deterministic, so bit-for-bit.
        assert a["weights_sha256"] == b["weights_sha256"], placement
        assert a["loss"] == b["loss"], placement


@pytest.mark.parametrize("compression", ["none", "fp16"])
def test_horovod_ranks_match_ftmpi_and_servers_stay_out(mpi, compression):
    res = mpi(
        4, [str(PROGS / "horovod_ranks.py"), compression], env={"FTMPI_SERVERS": "1"}, timeout=120
    )
    assert res.returncode == 0, res.stderr
    reports = sorted(res.json_lines(), key=lambda r: r["rank"])
    assert len(reports) == 3  # three workers printed; the server rank exited inside init()
    for i, r in enumerate(reports):
        assert (r["hvd_rank"], r["hvd_size"]) == (r["rank"], r["size"]) == (i, 3)
    assert reports[0]["servers_in_horovod"] == [False]


def test_a_chain_head_killed_under_the_horovod_backend_is_survived_bit_exact(tmp_path):
    """A worker waiting in a Horovod collective while another starts a recovery joins it
    (it waited out the timeout before); the run ends as the one without the failure."""
    digests = []
    for name, kill in (("ref", []), ("hit", ["--kill", "head@step=20"])):
        run_dir = tmp_path / name
        res = run_command(
            [
                *(sys.executable, "-m", "launch.cli", "-np", "2", "--servers", "3"),
                *("--strategy", "chain", *kill, "--run-dir", str(run_dir), "--"),
                *(sys.executable, str(PROGS / "ft_train.py"), "40", "--await-replacements"),
            ],
            env={"FTMPI_BACKEND": "horovod"},
            timeout=150,
        )
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 40
        digests.append(summary["weights_sha256"])
        assert summary["backend"] == "horovod" and summary["backend_fallback"] is None
    assert "ftmpi: recovered: server 0 replaced" in res.stderr
    assert digests[0] == digests[1]


def test_bit_exact_through_the_horovod_backend(mpi):
    res = mpi(
        4,
        [str(PROGS / "bitexact.py"), "sgd", "6"],
        env={"FTMPI_SERVERS": "2", "FTMPI_BACKEND": "horovod"},
    )
    assert res.returncode == 0, res.stderr
    (report,) = res.json_lines()
    assert report["mismatched"] == [] and report["applied"] == [6, 6]


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("opt(op=hvd.Adasum)", "op=hvd.Adasum is not supported"),
        ("opt(op=hvd.Max)", "op=hvd.Max is not supported"),
        ("opt(backward_passes_per_step=0)", "backward_passes_per_step=0 must be an int >= 1"),
        ("opt(compression=object())", "has no compress/decompress"),
        ("opt(gradient_predivide_factor=2.0, op=hvd.Sum)", "only meaningful with op=Average"),
    ],
)
def test_unsupported_arguments_fail_clearly(mpi, code, message):
    prog = (
        "import torch, ftmpi.horovod as hvd\nhvd.init()\nm = torch.nn.Linear(2, 2)\n"
        "def opt(**kw):\n    return hvd.DistributedOptimizer(torch.optim.SGD("
        "m.parameters(), lr=0.1), named_parameters=m.named_parameters(), **kw)\n" + code
    )
    res = mpi(2, ["-c", prog], env={"FTMPI_SERVERS": "1"}, timeout=60)
    assert res.returncode != 0
    assert message in res.stderr


def test_mpi_backend_refuses_fp16_compression(mpi):
    prog = (
        "import torch, ftmpi\nftmpi.init()\nm = torch.nn.Linear(2, 2)\n"
        "ftmpi.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), "
        "compression=ftmpi.Compression.fp16)"
    )
    res = mpi(2, ["-c", prog], env={"FTMPI_SERVERS": "1", "FTMPI_BACKEND": "mpi"}, timeout=60)
    assert res.returncode != 0
    assert "compression=FP16Compressor needs the Horovod backend" in res.stderr


def test_broadcast_helpers(mpi):
    prog = (
        "import json, torch, ftmpi\nftmpi.init()\n"
        "torch.manual_seed(ftmpi.rank())\nm = torch.nn.Linear(3, 2)\n"
        "o = torch.optim.Adam(m.parameters(), lr=0.1 * (ftmpi.rank() + 1))\n"
        "m(torch.randn(4, 3)).sum().backward(); o.step()\n"
        "ftmpi.broadcast_parameters(m.state_dict(), root_rank=0)\n"
        "ftmpi.broadcast_optimizer_state(o, root_rank=0)\n"
        "obj = ftmpi.broadcast_object({'r': ftmpi.rank()}, root_rank=0)\n"
        "print(json.dumps({'w': m.weight.sum().item(), 'lr': o.param_groups[0]['lr'],"
        " 'avg': o.state[m.weight]['exp_avg'].sum().item(), 'obj': obj}))"
    )
    res = mpi(3, ["-c", prog], env={"FTMPI_SERVERS": "1"}, timeout=60)
    assert res.returncode == 0, res.stderr
    a, b = res.json_lines()
    assert a == b and a["lr"] == 0.1 and a["obj"] == {"r": 0}


# ----------------------------------------------------------------- Horovod through failures

FT_TRAIN = str(PROGS / "ft_train.py")
FT_STEPS = 60


def _ft_train(mpi, run_dir, *, workers=2, servers=3, env=None, reports=None):
    """ft_train.py under the Horovod backend; the workers' reports and the run's summary."""
    full_env = {
        "FTMPI_SERVERS": str(servers),
        "FTMPI_RUN_DIR": str(run_dir),
        "FTMPI_BACKEND": "horovod",
        **(env or {}),
    }
    expect = workers if reports is None else reports
    res = mpi(
        workers + servers,
        [FT_TRAIN, str(FT_STEPS)],
        env=full_env,
        timeout=240,
        exit_hang_after=expect if "FTMPI_KILL" in full_env else 0,
    )
    assert res.returncode in (0, -9), res.stderr[-3000:]
    got = sorted(res.json_lines(), key=lambda r: r["worker"])
    assert len(got) == expect, res.stdout + res.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    return got, summary, read_events(str(run_dir))


def _of(evs, kind):
    return [e for e in evs if e["event"] == kind]


def test_a_server_death_leaves_horovod_alone_and_the_run_bit_exact(mpi, tmp_path):
    """A chain head SIGKILLed mid-run: the workers' communicator (Horovod's) never changes, so
    Horovod stays the backend all the way and the run ends as the one without the failure."""
    env = {"FTMPI_STRATEGY": "chain", "FTMPI_CHAIN_LENGTH": "3"}
    ref, ref_summary, _ = _ft_train(mpi, tmp_path / "ref", servers=3, env=env)
    kill = {**env, "FTMPI_KILL": "server:0@step=30"}
    got, summary, evs = _ft_train(mpi, tmp_path / "kill", servers=3, env=kill)
    assert _of(evs, "view_change"), "the server was not killed"
    assert summary["backend"] == ref_summary["backend"] == "horovod"
    assert summary["backend_fallback"] is None and not _of(evs, "backend_fallback")
    assert got[0]["versions"] == [FT_STEPS]
    assert got[0]["weights"] == got[1]["weights"] == ref[0]["weights"]


@pytest.mark.parametrize("respawn", ["0", "1"], ids=["shrink", "respawn"])
def test_a_worker_death_restarts_horovod_on_the_new_workers(mpi, tmp_path, respawn):
    """Worker 1 SIGKILLed between steps: the survivor shuts Horovod down and initialises it on
    the new workers' communicator (with the replacement, respawn_workers=1), and the run
    finishes on Horovod; with the replacement it ends as the run without the failure."""
    ref, _, _ = _ft_train(mpi, tmp_path / "ref", servers=2)
    env = {"FTMPI_KILL": "worker:1@step=20", "FTMPI_RESPAWN_WORKERS": respawn}
    reports = 2 if respawn == "1" else 1
    got, summary, evs = _ft_train(mpi, tmp_path / "kill", servers=2, env=env, reports=reports)
    assert _of(evs, "view_change")[0]["failed_workers"] == [1]
    assert summary["backend"] == "horovod" and summary["backend_fallback"] is None
    restarted = _of(evs, "backend_restarted")
    # on the new workers: the survivor alone, or the survivor and the replacement
    assert restarted and restarted[-1]["workers"] == reports, restarted
    assert summary["backend_restarts"] >= 1
    assert got[0]["versions"] == [FT_STEPS, FT_STEPS]
    if respawn == "1":
        assert [r["workers"] for r in got] == [2, 2]
        assert got[0]["weights"] == got[1]["weights"] == ref[0]["weights"]
    else:
        assert got[0]["workers"] == 1


@pytest.mark.parametrize("cut", ["clean", "cut"])
def test_a_cut_horovod_collective_restarts_horovod_else_it_is_kept(mpi, cut):
    """Workers unchanged: Horovod is kept as it is, unless a worker abandoned a Horovod
    collective when a recovery began (it could match a later one, or complete late into its
    tensor): then every worker restarts Horovod, and the next allreduce is right."""
    res = mpi(2, [str(PROGS / "horovod_cut.py"), cut], timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    reports = sorted(res.json_lines(), key=lambda r: r["worker"])
    assert len(reports) == 2
    for r in reports:
        assert r["backend"] == "horovod" and r["after"] == [3.0], r
        assert r["kept"] is (cut == "clean"), r
        assert not r["abandoned_written"], r
    if cut == "cut":
        assert "a recovery began" in reports[0]["raised"]
