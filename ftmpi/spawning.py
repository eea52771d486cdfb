"""Starting replacement processes (``MPI_Comm_spawn``) and telling them how to join.

A replacement is started one of two ways (:mod:`ftmpi.membership` decides which):

- **collectively**: every survivor calls ``MPI_Comm_spawn`` over the world and merges the
  new processes in (:func:`spawn`). Every survivor waits while the new process starts
  (Python, torch, ``MPI_Init``: about 2 s). Strategies whose workers wait for the replacement
  anyway (a rollback needs every shard served) do this.
- **in the background** (:class:`BackgroundSpawn`): the coordinator spawns on a thread of its
  own over ``MPI_COMM_SELF`` while training goes on, then opens a port. When the spawn has
  returned, the world admits the new processes at a step boundary with
  ``MPI_Comm_accept``/``MPI_Comm_connect`` and a merge (measured: about 15 ms).

Either way, each new process first makes itself ready (:func:`warm_up`, then
:func:`announce_ready`: the parent's rank 0 waits for it, :func:`await_ready`), then receives
a JSON message from its parent's rank 0 that says how to join (:func:`how_to_join`): ``merge``
(the collective spawn), ``connect`` to a port, or ``quit`` (the job finished before the
replacement was admitted).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from mpi4py import MPI

from ftmpi.config import Config
from ftmpi.fatal import UserError
from ftmpi.guards import deadline, failures
from ftmpi.wire import CommTimeout, PeerFailure, wait_all

HOW_TAG = 7301
"""Tag of the message that tells a new process how to join (on its parent intercommunicator)."""
READY_TAG = 7302
"""Tag of the message a new process sends its parent's rank 0 once it is ready to join."""
_HOW_BYTES = 4096  # an MPI port name is at most MPI_MAX_PORT_NAME (1024) characters


def replacement_command() -> list[str]:
    """The command a replacement runs: this process's script and arguments. Raises
    ``RuntimeError`` when the job was not started from a script file."""
    script = sys.argv[0] if sys.argv else ""
    if not script or script == "-c" or not os.path.exists(script):
        raise RuntimeError(
            f"cannot re-spawn a server: the job was not started from a script file ({script!r}); "
            "run `python train.py ...` so replacements can run the same script"
        )
    return [os.path.abspath(script), *sys.argv[1:]]


def spawn(
    comm: MPI.Intracomm, command: list[str], count: int, hosts: list[str] | None
) -> MPI.Intercomm:
    """Start ``count`` processes of this Python running ``command`` (collective over ``comm``,
    root 0): one ``MPI_Comm_spawn``, placed by Open MPI, when ``hosts`` is None; else
    ``MPI_Comm_spawn_multiple`` of one command per entry of ``hosts``, each with the Info key
    ``host``. A process-failure or revoked error becomes ``PeerFailure``; any other MPI error
    with ``hosts`` given becomes a :class:`~ftmpi.fatal.UserError` that names the nodes and
    what Open MPI needs to know of them. Returns the intercommunicator to the new processes."""
    infos = [_spawn_info(None)] if hosts is None else [_spawn_info(host) for host in hosts]
    try:
        with failures("spawning replacements (MPI_Comm_spawn)"):
            if hosts is None:
                inter = comm.Spawn(
                    sys.executable, args=command, maxprocs=count, root=0, info=infos[0]
                )
            else:
                inter = comm.Spawn_multiple(
                    [sys.executable] * count,
                    args=[command] * count,
                    maxprocs=[1] * count,
                    info=infos,
                    root=0,
                )
    except MPI.Exception as exc:
        if hosts is None:
            raise
        raise UserError(
            f"spawning replacements on node(s) {hosts} failed ({exc.Get_error_string()}): Open "
            "MPI must know each node by that name (MPI_Get_processor_name's): list it in the "
            "hostfile or the allocation, a spare node too (FTMPI_SPARE_NODES, with no rank "
            "mapped to it)"
        ) from exc
    finally:
        for info in infos:
            info.Free()
    inter.Set_errhandler(MPI.ERRORS_RETURN)
    return inter


def _spawn_info(host: str | None) -> MPI.Info:
    """A spawned process's Info: this working directory, and its node when ``host`` is given."""
    info = MPI.Info.Create()
    info.Set("wdir", os.getcwd())
    if host is not None:
        info.Set("host", host)
    return info


def warm_up() -> None:
    """Do the start-up work a new process would otherwise do after joining, while the others
    train: the first optimizer a process constructs imports ``torch._dynamo`` (measured: 1.0 s
    here), which a replacement server would otherwise do on its first INIT, with the workers
    waiting."""
    import torch

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def announce_ready(parent: MPI.Intercomm, timeout: float) -> None:
    """New process side: tell the parent's rank 0 that this process is ready to join."""
    flag = np.ones(1, dtype=np.uint8)
    wait_all([parent.Isend(flag, dest=0, tag=READY_TAG)], timeout, "saying it is ready")


def await_ready(inter: MPI.Intercomm, timeout: float) -> None:
    """Parent side (local rank 0 of ``inter``): wait until every new process is ready
    (:func:`announce_ready`). Raises ``PeerFailure`` or ``CommTimeout``."""
    flags = np.zeros(inter.Get_remote_size(), dtype=np.uint8)
    reqs = [inter.Irecv(flags[i : i + 1], source=i, tag=READY_TAG) for i in range(flags.size)]
    wait_all(reqs, timeout, "waiting for the replacements to start")


def tell_replacements(inter: MPI.Intercomm, how: dict[str, str], timeout: float) -> None:
    """Parent side (local rank 0 of ``inter``): send every new process ``how`` to join.
    Raises ``PeerFailure`` or ``CommTimeout``."""
    data = json.dumps(how).encode()
    buf = np.zeros(_HOW_BYTES, dtype=np.uint8)
    buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    reqs = [inter.Isend(buf, dest=i, tag=HOW_TAG) for i in range(inter.Get_remote_size())]
    wait_all(reqs, timeout, "telling the replacements how to join")


def how_to_join(parent: MPI.Intercomm, timeout: float) -> dict[str, str]:
    """New process side: the message of :func:`tell_replacements` (from the parent's rank 0).
    Raises ``PeerFailure`` when the parent died, ``CommTimeout`` after ``timeout`` s."""
    buf = np.zeros(_HOW_BYTES, dtype=np.uint8)
    wait_all([parent.Irecv(buf, source=0, tag=HOW_TAG)], timeout, "waiting to be admitted")
    how: dict[str, str] = json.loads(buf.tobytes().rstrip(b"\0"))
    return how


def bcast_json(comm: MPI.Comm, doc: Any, timeout: float, root: int = 0) -> Any:
    """Root's JSON-able ``doc`` on every rank of ``comm`` (the others pass anything)."""
    n = np.zeros(1, dtype=np.int64)
    mine = comm.Get_rank() == root
    data = json.dumps(doc).encode() if mine else b""
    n[0] = len(data)
    wait_all([comm.Ibcast(n, root=root)], timeout, "broadcasting a JSON document")
    buf = (
        np.frombuffer(bytearray(data), dtype=np.uint8)
        if mine
        else np.empty(int(n[0]), dtype=np.uint8)
    )
    wait_all([comm.Ibcast(buf, root=root)], timeout, "broadcasting a JSON document")
    return json.loads(buf.tobytes())


def gather_nodes(comm: MPI.Comm, timeout: float) -> list[str]:
    """Every rank's node (``MPI_Get_processor_name``), by rank of ``comm``; collective over
    ``comm``. Raises ``PeerFailure`` if a rank died, ``CommTimeout`` after ``timeout`` s."""
    width = MPI.MAX_PROCESSOR_NAME
    mine = np.zeros(width, dtype=np.uint8)
    name = MPI.Get_processor_name().encode()[:width]
    mine[: len(name)] = np.frombuffer(name, dtype=np.uint8)
    every = np.empty(comm.Get_size() * width, dtype=np.uint8)
    wait_all([comm.Iallgather(mine, every)], timeout, "gathering every rank's node name")
    return [
        row.tobytes().rstrip(b"\0").decode(errors="replace") for row in every.reshape(-1, width)
    ]


class StartFailed(Exception):
    """Open MPI started the replacements but not every one said it was ready: one died (Open
    MPI 5.0 does not tell the parents), or one stayed silent past ``config.start_timeout``
    (measured in 11 of 25 jobs spawning onto a spare node of the namespace cluster: the process
    blocked for good in Open MPI's own start-up exchange, ``PMIx_Get``). They cannot join; the
    coordinator spawns again (:mod:`ftmpi.membership`)."""


class BackgroundSpawn:
    """Replacements for ``slots`` (server slots) and ``new_workers`` dead workers, spawned on a
    thread of the coordinator over ``MPI_COMM_SELF`` while training goes on.

    Guarantees: :attr:`ready` turns True once the spawn returned and every new process said
    it is ready, or once it failed (:attr:`error`: :class:`StartFailed` when a new process died
    or stayed silent for ``config.start_timeout`` s, with :attr:`stuck` the intercommunicator to
    them; else the spawn's own error); until the world admits them (:meth:`port`, then
    ``MPI_Comm_accept``) the new processes wait in :func:`how_to_join`. The spawn runs under
    :func:`~ftmpi.guards.deadline` (this process ends with a message if Open MPI never returns
    from it). :meth:`dismiss` at exit tells spawned processes that were never admitted to
    quit."""

    def __init__(
        self,
        config: Config,
        role: str,
        slots: list[int],
        new_workers: int,
        start: Callable[[], MPI.Intercomm],
        nodes: list[str] | None = None,
    ) -> None:
        self.config = config
        self.role = role
        self.slots = slots
        self.new_workers = new_workers
        self.nodes = nodes
        """The nodes the new processes were placed on by name (None: placed by Open MPI)."""
        self.inter: MPI.Intercomm | None = None
        self.stuck: MPI.Intercomm | None = None
        self.error: BaseException | None = None
        self._port = ""
        self._thread = threading.Thread(
            target=self._run, args=(start,), name="ftmpi-spawn", daemon=True
        )
        self._thread.start()

    def _run(self, start: Callable[[], MPI.Intercomm]) -> None:
        try:
            with deadline(self.config, self.role, "spawning replacements (MPI_Comm_spawn)"):
                inter = start()
        except BaseException as exc:  # re-raised on the main thread by the caller
            self.error = exc
            return
        try:
            await_ready(inter, min(self.config.start_timeout, self.config.timeout))
        except (PeerFailure, CommTimeout) as exc:
            self.error, self.stuck = StartFailed(str(exc)), inter
            return
        except BaseException as exc:
            self.error = exc
            return
        self.inter = inter

    @property
    def ready(self) -> bool:
        """Whether the spawn has returned (successfully or with :attr:`error`)."""
        return not self._thread.is_alive()

    def port(self) -> str:
        """Open a port and send it to the new processes (``connect``); returns it for
        ``MPI_Comm_accept``. Call once :attr:`ready` and without :attr:`error`. Raises
        ``PeerFailure`` or ``CommTimeout`` if a new process is gone."""
        assert self.inter is not None
        self._port = MPI.Open_port()
        tell_replacements(self.inter, {"join": "connect", "port": self._port}, 30.0)
        return self._port

    def close(self) -> None:
        """After the admission: close the port (the spawn's intercommunicator stays open, to be
        freed at exit with the others)."""
        if self._port:
            with contextlib.suppress(MPI.Exception):
                MPI.Close_port(self._port)
            self._port = ""

    def dismiss(self) -> None:
        """At exit, for a spawn never admitted: wait for it (bounded by its deadline), tell the
        new processes to quit and disconnect from them."""
        self._thread.join(self.config.timeout)
        inter = self.inter
        if inter is None:
            return
        with contextlib.suppress(Exception):
            tell_replacements(inter, {"join": "quit"}, 10.0)
            with deadline(self.config, self.role, "disconnecting unneeded replacements"):
                inter.Disconnect()
        self.inter = None
