"""A model on a GPU, in both placements (``scripts/device-check.sh`` runs these on a GPU
machine; elsewhere they skip, saying why). ``mirror``: the workers step their optimizer on the
GPU, as a run without servers does, so the weights are that run's bit for bit; a chain head
killed costs nothing of them. ``server``: the servers step on a CPU, so the weights agree with
the GPU's to within rounding only."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import PROGS, run_command

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no GPU: torch.cuda.is_available() is False"
    ),
]

STEPS = 30


def train(run_dir: Path, *options: str) -> dict:
    res = run_command(
        [
            *(sys.executable, "-m", "launch.cli", "-np", "2", *options),
            *("--run-dir", str(run_dir), "--", sys.executable, str(PROGS / "gpu_train.py")),
            str(STEPS),
        ],
        env={"FTMPI_BACKEND": "mpi", "FTMPI_TIMEOUT": "120", "OMP_NUM_THREADS": "1"},
        timeout=240,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    (report,) = res.json_lines()
    assert report["device"] == "cuda:0"
    return report


def test_mirror_on_a_gpu_is_bit_exact_with_no_servers_and_server_placement_is_close(tmp_path):
    alone = train(tmp_path / "alone", "--servers", "0")
    mirror = train(tmp_path / "mirror", "--servers", "1", "--placement", "mirror")
    server = train(tmp_path / "server", "--servers", "1")
    assert mirror["weights"] == alone["weights"]
    assert mirror["versions"] == server["versions"] == [STEPS]
    for name, value in alone["sums"].items():
        assert math.isclose(server["sums"][name], value, rel_tol=1e-4, abs_tol=1e-4), name


def test_mirror_on_a_gpu_loses_nothing_when_a_chain_head_dies(tmp_path):
    chain = ("--servers", "3", "--strategy", "chain", "--placement", "mirror")
    whole = train(tmp_path / "whole", *chain)
    hit = train(tmp_path / "hit", *chain, "--kill", "head@step=15")
    assert hit["weights"] == whole["weights"] and hit["versions"] == [STEPS]
