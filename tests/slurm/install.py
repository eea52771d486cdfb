"""Install munge, Slurm (Debian's slurm-wlm, slurmdbd) and MariaDB with apt-get when missing.

Fast path: every package already installed, nothing runs. Otherwise ``apt-get install`` (and,
if that fails, ``apt-get update`` and one more try); a failure stops the tests with apt's own
last lines and what to install by hand.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

PACKAGES = (
    "munge",
    "slurm-wlm",
    "slurmctld",
    "slurmd",
    "slurm-client",
    "libpmix-dev",
    "slurmdbd",
    "mariadb-server-core",
    "mariadb-client-core",
)
"""The daemons, the client commands, PMIx for ``srun --mpi=pmix`` (Slurm's pmix plugin loads
``libpmix.so``, which only the -dev package provides), and accounting: slurmdbd on a MariaDB
server the fixture starts itself (the -core packages hold ``mariadbd`` and
``mariadb-install-db`` without a system service that would start on installation)."""

APT_TIMEOUT = 600


def missing_packages() -> list[str]:
    """Packages of :data:`PACKAGES` that dpkg does not list as installed."""
    if not shutil.which("dpkg-query"):
        return list(PACKAGES)
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\\n", *PACKAGES],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    installed = {line.split()[0] for line in out.splitlines() if line.endswith(" installed")}
    return [p for p in PACKAGES if p not in installed]


def ensure_slurm() -> None:
    """Make sure every package of :data:`PACKAGES` is installed; fail the tests if it cannot be."""
    missing = missing_packages()
    if not missing:
        return
    how = f"apt-get install {' '.join(PACKAGES)}"
    if not shutil.which("apt-get"):
        pytest.fail(f"Slurm tests need {', '.join(missing)}; no apt-get here: install them ({how})")
    if os.geteuid() != 0:
        pytest.fail(f"Slurm tests need {', '.join(missing)}; run as root or install them: {how}")
    result = _apt("install", "-y", "--no-install-recommends", *missing)
    if result.returncode != 0:
        _apt("update")
        result = _apt("install", "-y", "--no-install-recommends", *missing)
    if result.returncode != 0 or missing_packages():
        pytest.fail(
            f"could not install {', '.join(missing)} with apt-get (status {result.returncode}); "
            f"install them by hand ({how}). apt-get said:\n{result.stdout[-2000:]}"
        )


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "-q", *args]
    try:
        return subprocess.run(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=APT_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        return subprocess.CompletedProcess(cmd, -9, out + f"\n(killed after {APT_TIMEOUT} s)")
