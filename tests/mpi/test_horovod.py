"""Horovod drop-in: same weights as plain Horovod, Horovod on workers only, hvd arguments."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import PROGS, ROOT, run_command

pytestmark = pytest.mark.mpi

PLAIN = str(ROOT / "examples" / "horovod_digits.py")
WITH_FTMPI = str(ROOT / "examples" / "horovod_digits_ftmpi.py")


def test_horovod_is_installed_with_mpi():
    import horovod.torch as hvd

    assert hvd.mpi_built()


def test_example_with_ftmpi_trains_to_the_same_weights_as_plain_horovod(mpi):
    plain = mpi(2, [PLAIN, "--steps", "40"], timeout=180)
    assert plain.returncode == 0, plain.stderr
    ours = mpi(3, [WITH_FTMPI, "--steps", "40"], env={"FTMPI_SERVERS": "1"}, timeout=180)
    assert ours.returncode == 0, ours.stderr
    (a,), (b,) = plain.json_lines(), ours.json_lines()
    assert a["workers"] == b["workers"] == 2
    # Horovod's allreduce of two ranks is a single addition: deterministic, so bit-for-bit.
    assert a["weights_sha256"] == b["weights_sha256"]
    assert a["loss"] == b["loss"]


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
                *(sys.executable, str(PROGS / "ft_train.py"), "40"),
            ],
            env={"FTMPI_BACKEND": "horovod"},
            timeout=150,
        )
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 40
        digests.append(summary["weights_sha256"])
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
