"""Run configuration: one frozen dataclass, read from keyword arguments and ``FTMPI_*`` variables.

Precedence, highest first: keyword arguments to :func:`ftmpi.init`, ``FTMPI_<FIELD>`` environment
variables (what ``ftmpi-run`` sets, so a plain ``mpirun`` with the same variables behaves the same),
then the defaults below. Every value is checked here, before any MPI traffic; a bad value raises
:class:`ConfigError` naming the value and the fix.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ftmpi.strategies import StrategyName

ENV_PREFIX = "FTMPI_"


class Mode(enum.StrEnum):
    """The values of ``mode``."""

    SYNC = "sync"
    ASYNC = "async"


class Placement(enum.StrEnum):
    """The values of ``placement``."""

    SERVER = "server"
    MIRROR = "mirror"


class ChainAck(enum.StrEnum):
    """The values of ``chain_ack``."""

    TAIL = "tail"
    NEXT = "next"


class StalePolicy(enum.StrEnum):
    """The values of ``stale_policy``."""

    SUM_SCALED = "sum-scaled"
    MEAN = "mean"
    STALENESS_WEIGHTED = "staleness-weighted"


class BackendName(enum.StrEnum):
    """The values of ``backend``."""

    AUTO = "auto"
    MPI = "mpi"
    HOROVOD = "horovod"


CHOICES: dict[str, type[enum.StrEnum]] = {
    "mode": Mode,
    "placement": Placement,
    "strategy": StrategyName,
    "chain_ack": ChainAck,
    "stale_policy": StalePolicy,
    "backend": BackendName,
}
"""The fields whose value is one of a fixed set, and the enum of that set. A member compares
equal to its string (``Mode.SYNC == "sync"``)."""
FLAGS = ("respawn_workers", "async_checkpoint", "resume", "deterministic", "overlap")
"""The fields that are on or off (``bool``). From the environment: 0/1/true/false."""
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""A host name as hostfiles and batch systems write it."""
_TRUE = ("1", "true")
_FALSE = ("0", "false")

MODES = tuple(m.value for m in Mode)
PLACEMENTS = tuple(p.value for p in Placement)
STRATEGIES = tuple(s.value for s in StrategyName)
CHAIN_ACKS = tuple(a.value for a in ChainAck)
STALE_POLICIES = tuple(p.value for p in StalePolicy)
BACKENDS = tuple(b.value for b in BackendName)


NODE_COPIES = "node-copies"
"""The run directory's folder where the launcher gathers the surviving nodes' node copies
(``<run_dir>/node-copies/<node>/slot<j>/``, see ``node_copy_dir``) before a relaunch."""


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the value and how to fix it."""


@dataclass(frozen=True)
class Config:
    """Everything that shapes a run. Field ``x`` is also read from ``FTMPI_X``."""

    servers: int = 1
    """Number of parameter-server ranks; they are the last ``servers`` ranks of COMM_WORLD.
    0 runs plain data-parallel training (collective backend only, no servers)."""
    mode: Mode = Mode.SYNC
    """``sync``: workers average gradients, then one push per shard per step.
    ``async``: each worker pushes and pulls on its own; servers apply as gradients arrive."""
    placement: Placement = Placement.SERVER
    """Where the optimizer step runs in sync mode. ``server``: the servers own the weights;
    the shard leaders push the averaged gradient and every worker takes the new weights from
    them. ``mirror``: every worker runs its own optimizer step on the averaged gradient (as
    plain Horovod does) and the shard leaders send that gradient to the servers without
    waiting for an answer; the servers apply it to a mirror of the state, which the strategy
    replicates or snapshots. Async mode needs ``server``."""
    mirror_lag: int = 2
    """``mirror``: updates a shard's mirror may be behind the workers; a shard leader whose
    oldest unanswered update is this many steps old waits for it (back-pressure)."""
    overlap: bool = True
    """Sync mode: average gradients during backward, a bucket at a time as backward produces
    them (:mod:`ftmpi.buckets`), as Horovod and DDP do; as with them, a change made to
    ``p.grad`` after backward is not averaged (use ``synchronize()`` and
    ``skip_synchronize()``). Off: the whole gradient is averaged at ``step()``, as found."""
    bucket_bytes: int = 1 << 20
    """``overlap``: bytes of gradient per bucket (whole parameters; a larger one alone)."""
    strategy: StrategyName = StrategyName.NONE
    """Recovery strategy for server failures: ``none`` (a server death ends the job with a clear
    error), ``checkpoint`` (snapshots; everyone rolls back to the newest valid one), ``chain``
    (each shard replicated on a chain of servers), ``stateless`` (workers log gradients while a
    server is down; its replacement applies them) or ``chain+stateless`` (both)."""
    chain_length: int = 3
    """``chain``: servers per shard (head -> ... -> tail); ``servers`` must be a multiple."""
    chain_ack: ChainAck = ChainAck.TAIL
    """``chain``: a push commits when the ``tail`` has it (no update is lost; the head answers
    once the previous one has committed and the pushing worker keeps the gradient until then)
    or when the ``next`` server has received it (the paper's relaxed mode)."""
    replicate_every: int = 1
    """``chain``: with N > 1 (and ``next`` ack, the paper's chain) the head sends its whole
    state down the chain every N updates, in the background, instead of forwarding each update;
    a head's death loses the updates its successor has not received: fewer than 2N."""
    stale_policy: StalePolicy = StalePolicy.SUM_SCALED
    """``stateless``: how a replacement applies the gradients logged while its server was down:
    ``sum-scaled`` (the paper's: their sum, at a tenth of the LR if more than 50), ``mean``, or
    ``staleness-weighted`` (weights 1/(1+age), age: steps since the outage's first logged
    gradient)."""
    max_staleness: int = 0
    """``stateless``: a worker with this many logged gradients for a down shard waits for its
    replacement (0: never wait)."""
    respawn_workers: bool = False
    """Replace a dead worker with a newly spawned rank (after ``down_for``); otherwise continue
    with the survivors."""
    down_for: float = 0.0
    """Seconds a dead server stays down before its replacement is spawned."""
    spare_nodes: str = ""
    """Nodes kept free for replacements, comma-separated (``node7,node8``), named as the
    hostfile or the allocation names them; Open MPI must know them (listed, no rank mapped
    there). A replacement prefers a spare node (:mod:`ftmpi.placement`)."""
    checkpoint_every: int = 100
    """``checkpoint``: snapshot every N updates of a server (and at start)."""
    checkpoint_dir: str = ""
    """``checkpoint``: directory of snapshots (default ``<run_dir>/checkpoints``)."""
    checkpoint_keep: int = 3
    """``checkpoint``: snapshots kept per shard (older ones are deleted once a newer is durable)."""
    async_checkpoint: bool = False
    """``checkpoint``: write snapshots on a background thread (training does not wait)."""
    resume: bool = False
    """Start from the newest valid snapshot in the checkpoint directory if there is one."""
    attempt: int = 0
    """Which start of the run this job is (``ftmpi-run`` numbers them; see :mod:`ftmpi.fence`)."""
    node_copy_dir: str = ""
    """``chain``: a node-local directory (e.g. under ``/dev/shm``) where each server keeps the
    newest versions of its shard as it applies them, so the state outlives a job that Open MPI
    ended when it lost a node; a relaunch (``ftmpi-run --max-restarts``) resumes from the
    copies the surviving nodes hold. Empty: none kept (``ftmpi-run`` sets it for a multi-node
    chain)."""
    kill: str = ""
    """Failure injection schedule, e.g. ``server:0@step=50,server:0@30s`` (see ftmpi.faults)."""
    failpoints: str = ""
    """Kill a rank at a named place in the code, e.g. ``apply@server:0#5`` (ftmpi.failpoints)."""
    backend: BackendName = BackendName.AUTO
    """Collective backend among workers: ``horovod`` if importable and ``auto``, else ``mpi``."""
    timeout: float = 300.0
    """Seconds any single blocking wait may take before :class:`ftmpi.CommTimeout` is raised."""
    server_idle_timeout: float = 3600.0
    """Seconds a server waits for the next message before it gives up and exits non-zero."""
    start_timeout: float = 120.0
    """Seconds a replacement spawned in the background may take to come up (start, import,
    ``MPI_Init``, say it is ready) before the coordinator drops it and spawns again
    (:class:`ftmpi.spawning.StartFailed`); at most ``timeout``."""
    server_threads: int = 1
    """Intra-op threads (``torch.set_num_threads``) a server rank uses for the optimizer."""
    chunk_bytes: int = 1 << 20
    """Tensors larger than this travel as several MPI messages of at most this size."""
    run_id: str = ""
    """Identifies the run on the wire and on disk; generated on worker 0 when empty."""
    run_dir: str = ""
    """Directory for metrics, manifest and events; empty disables run-directory output."""
    seed: int = 0
    """Base seed recorded in the manifest and used by ftmpi's samplers."""
    deterministic: bool = False
    """``torch.use_deterministic_algorithms(True)`` on every rank (plus the cuDNN/cuBLAS
    settings it needs), and the run's remaining sources of non-bit-exactness are warned about
    and recorded in the manifest (see :mod:`ftmpi.repro`). Off: torch's defaults."""
    extra: Mapping[str, str] = field(default_factory=dict, compare=False)
    """Unrecognised ``FTMPI_*`` variables, kept for the manifest."""

    def __post_init__(self) -> None:
        # Config(mode="sync", resume=1) built directly: the same types as from_env gives
        for name, choice in CHOICES.items():
            value = getattr(self, name)
            if not isinstance(value, choice):
                object.__setattr__(self, name, _choice(name, choice, value, source=f"{name}="))
        for name in FLAGS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                object.__setattr__(self, name, _flag(name, value, source=f"{name}="))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Build a config from ``environ`` (default ``os.environ``) and keyword ``overrides``.

        Overrides that are ``None`` are ignored, so ``init(servers=None)`` defers to the
        environment. Raises :class:`ConfigError` for unknown keywords and unparsable values.
        """
        environ = os.environ if environ is None else environ
        names = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ConfigError(
                f"unknown ftmpi option(s) {unknown}; valid options are {sorted(names)}"
            )
        values: dict[str, Any] = {}
        extra: dict[str, str] = {}
        for key, raw in environ.items():
            if not key.startswith(ENV_PREFIX):
                continue
            name = key[len(ENV_PREFIX) :].lower()
            if name in names:
                values[name] = _parse(names[name], raw, source=key)
            else:
                extra[key] = raw
        for name, value in overrides.items():
            if value is not None:
                values[name] = _parse(names[name], value, source=f"{name}=")
        return cls(**values, extra=extra).checked()

    def checked(self) -> Config:
        """Return ``self`` after checking values that do not depend on the world size."""
        if self.servers < 0:
            raise ConfigError(
                f"servers={self.servers} is negative; use 0 (no servers) or a positive count"
            )
        for name in ("chain_length", "replicate_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_staleness < 0:
            raise ConfigError(f"max_staleness={self.max_staleness} must be >= 0")
        if self.chain_ack == "tail" and self.replicate_every != 1:
            raise ConfigError(
                f"replicate_every={self.replicate_every} needs chain_ack='next': with 'tail' a "
                "push commits only when the tail has it, so every update is forwarded at once"
            )
        if self.chained and self.servers % self.chain_length:
            raise ConfigError(
                f"strategy='{self.strategy}' with chain_length={self.chain_length} needs a "
                f"multiple of {self.chain_length} servers, not servers={self.servers}; use "
                f"servers={max(1, self.servers // self.chain_length) * self.chain_length} or "
                "another chain_length"
            )
        for name in ("timeout", "server_idle_timeout", "start_timeout"):
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigError(
                    f"{name}={getattr(self, name)} must be a positive number of seconds"
                )
        if self.server_threads < 1:
            raise ConfigError(f"server_threads={self.server_threads} must be >= 1")
        if self.chunk_bytes < 1024:
            raise ConfigError(f"chunk_bytes={self.chunk_bytes} is too small; use at least 1024")
        if not 0 <= self.down_for < math.inf:
            raise ConfigError(
                f"down_for={self.down_for} is negative or not finite; use seconds >= 0"
            )
        self._check_spare_nodes()
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every={self.checkpoint_every} must be >= 1")
        if self.checkpoint_keep < 1:
            raise ConfigError(f"checkpoint_keep={self.checkpoint_keep} must be >= 1")
        if self.strategy != "none" and self.servers == 0:
            raise ConfigError(
                f"strategy='{self.strategy}' needs parameter servers; set servers >= 1"
            )
        if self.strategy == "checkpoint" and not (self.checkpoint_dir or self.run_dir):
            raise ConfigError("strategy='checkpoint' needs checkpoint_dir or run_dir for snapshots")
        if self.failpoints:
            from ftmpi.failpoints import parse_failpoints

            try:
                parse_failpoints(self.failpoints)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.kill:
            from ftmpi.faults import parse_schedule

            try:
                parse_schedule(self.kill)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.mode == "async" and self.servers == 0:
            raise ConfigError("mode='async' needs parameter servers; set servers >= 1")
        if self.mirrored and self.mode == "async":
            raise ConfigError(
                "placement='mirror' needs mode='sync' (async workers each push their own "
                "gradient and take the servers' weights); use placement='server' in async mode"
            )
        if self.mirror_lag < 1:
            raise ConfigError(f"mirror_lag={self.mirror_lag} must be >= 1")
        if self.bucket_bytes < 1:
            raise ConfigError(
                f"bucket_bytes={self.bucket_bytes} must be >= 1 (bytes of gradient per bucket; "
                "the default is 1048576)"
            )
        return self

    def _check_spare_nodes(self) -> None:
        for i, name in enumerate(self.spares):
            if not _NODE_NAME.fullmatch(name):
                raise ConfigError(
                    f"spare_nodes={self.spare_nodes!r}: {name!r} is not a node name; list the "
                    "spare nodes' host names separated by commas, e.g. spare_nodes='node7,node8'"
                )
            if name in self.spares[:i]:
                raise ConfigError(
                    f"spare_nodes={self.spare_nodes!r} names {name!r} twice; list each spare "
                    "node once"
                )

    def check_world(self, world_size: int) -> int:
        """Check the rank layout for a world of ``world_size`` ranks; return the worker count."""
        workers = world_size - self.servers
        if self.kill and self.servers < world_size:
            from ftmpi.faults import check_schedule, parse_schedule

            try:
                check_schedule(parse_schedule(self.kill), workers=workers, servers=self.servers)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.servers >= world_size:
            raise ConfigError(
                f"servers={self.servers} leaves {max(workers, 0)} worker rank(s) in a world of "
                f"{world_size}; launch at least {self.servers + 1} ranks "
                f"(e.g. ftmpi-run -np 1 --servers {self.servers}) or lower servers"
            )
        return workers

    @property
    def mirrored(self) -> bool:
        """Whether workers step their own optimizer and servers keep a mirror (``mirror``
        placement with servers)."""
        return self.placement == "mirror" and self.servers > 0

    @property
    def chained(self) -> bool:
        """Whether shards are replicated on chains of servers."""
        return self.strategy in ("chain", "chain+stateless")

    @property
    def replicates_state(self) -> bool:
        """Whether a chain's head sends its whole state down the chain every
        ``replicate_every`` updates, off the workers' path (``next`` ack, N > 1: the paper's
        chain), instead of forwarding each update (``ftmpi.chain``)."""
        return self.chained and self.chain_ack == "next" and self.replicate_every > 1

    @property
    def answers_before_commit(self) -> bool:
        """Whether a chain head answers a fresh push once every *earlier* update is committed
        (``tail`` ack on chains of more than one server), so the pushing worker keeps it until
        its next push is answered (``ServerClient.kept``)."""
        return self.chained and self.chain_ack == "tail" and self.chain_length > 1

    @property
    def logs_gradients(self) -> bool:
        """Whether workers keep computing and log gradients while a shard has no server."""
        return self.strategy in ("stateless", "chain+stateless")

    @property
    def num_shards(self) -> int:
        """Shards of the model: one per server, or one per chain of ``chain_length`` servers."""
        return self.servers // self.chain_length if self.chained else self.servers

    @property
    def spares(self) -> tuple[str, ...]:
        """The spare nodes' names (``spare_nodes`` split at commas, each stripped)."""
        if not self.spare_nodes.strip():
            return ()
        return tuple(name.strip() for name in self.spare_nodes.split(","))

    @property
    def snapshot_dir(self) -> str:
        return self.checkpoint_dir or (f"{self.run_dir}/checkpoints" if self.run_dir else "")

    def env(self) -> dict[str, str]:
        """The ``FTMPI_*`` variables that reproduce this config in another process."""
        out = {
            ENV_PREFIX + f.name.upper(): _env_value(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name != "extra"
        }
        out.update(self.extra)
        return out


def _env_value(value: object) -> str:
    """How the environment spells a field's value: a flag as 0/1, a choice as its string."""
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


def _choice(name: str, choice: type[enum.StrEnum], raw: object, *, source: str) -> Any:
    """``raw`` as a member of ``choice``; :class:`ConfigError` naming the valid values."""
    text = raw.strip() if isinstance(raw, str) else str(raw)
    try:
        return choice(text)
    except ValueError:
        raise ConfigError(
            f"{name}={text!r} is not one of {[m.value for m in choice]}"
            + ("" if source.endswith("=") else f" (from {source})")
        ) from None


def _flag(name: str, raw: object, *, source: str) -> bool:
    """``raw`` as a flag: ``True``/``False``, 0/1, or the strings 0/1/true/false (any case);
    :class:`ConfigError` naming the value otherwise."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str) and raw.strip().lower() in _TRUE + _FALSE:
        return raw.strip().lower() in _TRUE
    shown = raw.strip() if isinstance(raw, str) else raw
    if source.endswith("="):
        raise ConfigError(f"{name}={shown!r} must be 0 or 1 (or False/True)")
    raise ConfigError(f"{source}={shown!r} must be 0, 1, false or true (option {name!r})")


def _parse(f: dataclasses.Field[Any], raw: Any, *, source: str) -> Any:
    """Convert ``raw`` (a string from the environment, or a Python value) to the field's type."""
    if f.name in CHOICES:
        return _choice(f.name, CHOICES[f.name], raw, source=source)
    if f.name in FLAGS:
        return _flag(f.name, raw, source=source)
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if kind == "float":
            return float(raw)
        return str(raw).strip()
    except (TypeError, ValueError):
        raise ConfigError(
            f"{source}{raw!r} is not a valid {kind} for option {f.name!r} (default {f.default!r})"
        ) from None
