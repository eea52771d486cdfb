"""The ``slurm`` fixture: a real single-node Slurm cluster shared by the tests in this package.

Installs munge and Slurm with apt-get when they are missing (nothing runs when they are
present), starts the cluster in a temporary directory, yields it (``slurm.env`` holds
``SLURM_CONF``), and at the end cancels every job, stops the daemons by PID and fails if any
process of the cluster is left. Jobs run as root on this machine, so they use the project's venv
(``sys.prefix``) directly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm.cluster import SlurmCluster, SlurmError
from tests.slurm.install import ensure_slurm


@pytest.fixture(scope="package")
def slurm() -> Iterator[SlurmCluster]:
    if os.geteuid() != 0:
        pytest.fail("the Slurm tests start slurmctld/slurmd as SlurmUser=root: run them as root")
    ensure_slurm()
    # not under pytest's 0700 temporary tree: munged runs as the munge user and must reach it
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="ftmpi-slurm-")))
    try:
        cluster.start()
    except (SlurmError, OSError) as exc:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
        pytest.fail(f"could not start a Slurm cluster: {exc}")
    yield cluster
    left = cluster.stop()
    shutil.rmtree(cluster.root, ignore_errors=True)
    assert not left, f"processes of the Slurm cluster were still running (now killed): {left}"
