"""Fixtures for tests on a real multi-node cluster of namespaces on this machine.

``cluster``: 3 nodes (:class:`tests.multinode.cluster.Cluster`) built once for the session, in
well under a second, and removed at its end with a check that nothing of them is left; each test
gets every node up with its link up (a node an earlier test killed is revived, a cut link
restored). ``slurm_cluster``: a Slurm cluster with accounting on those nodes, started for the
test that asks for it (about 6 s) and stopped after it. Without root or ``ip netns`` the tests
are skipped; any other failure to build the cluster fails them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multinode.cluster import Cluster
from tests.slurm.cluster import SlurmCluster, SlurmError
from tests.slurm.install import ensure_slurm

TOOLS = ("ip", "nsenter", "unshare", "setpriv")


def why_no_namespaces() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if missing := [t for t in TOOLS if not shutil.which(t)]:
        return f"no {', '.join(missing)} (iproute2, util-linux)"
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return f"`ip netns` does not work here: {res.stderr.strip()}"
    return None


@pytest.fixture(scope="session")
def multinode_cluster() -> Iterator[Cluster]:
    if why := why_no_namespaces():
        pytest.skip(f"no multi-node cluster: {why}")
    cluster = Cluster.create(3)
    atexit.register(cluster.stop)  # an interrupted session that skips its finalizers
    try:
        yield cluster
    finally:
        cluster.stop()
        atexit.unregister(cluster.stop)


@pytest.fixture
def cluster(multinode_cluster: Cluster) -> Cluster:
    multinode_cluster.ensure_up()
    return multinode_cluster


@pytest.fixture
def slurm_cluster(cluster: Cluster) -> Iterator[SlurmCluster]:
    ensure_slurm()
    slurm = SlurmCluster(Path(tempfile.mkdtemp(prefix="slurm-", dir=cluster.shared)), cluster)
    try:
        slurm.start(timeout=60)
    except (SlurmError, OSError) as exc:
        slurm.stop()
        shutil.rmtree(slurm.root, ignore_errors=True)
        pytest.fail(f"could not start Slurm on the nodes: {exc}")
    yield slurm
    left = slurm.stop()
    shutil.rmtree(slurm.root, ignore_errors=True)
    assert not left, f"processes of the Slurm cluster were still running (now killed): {left}"
