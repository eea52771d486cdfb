"""Launcher flags that set ``ftmpi.config.Config`` fields, and the job environment they make.

Each flag here maps to one ``FTMPI_<FIELD>`` variable; a flag left out keeps the caller's
``FTMPI_*`` value, then Config's default. The resulting environment is validated exactly as
the ranks will read it (``Config.from_env`` + ``check_world`` + the kill schedule against the
shard count and the run's length), so a bad value or combination stops the launcher with
ftmpi's :class:`~ftmpi.config.ConfigError` message before anything starts.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ftmpi.config import (
    CHAIN_ACKS,
    ENV_PREFIX,
    MODES,
    PLACEMENTS,
    STALE_POLICIES,
    STRATEGIES,
    Config,
    ConfigError,
)
from ftmpi.faults import KillSpec, check_schedule, format_schedule, parse_schedule


@dataclass(frozen=True)
class ConfigFlag:
    """``--flag`` setting Config field ``field``."""

    field: str
    kind: type
    help: str
    choices: tuple[str, ...] | None = None
    switch: bool = False
    """A flag without a value that sets the field to 1."""

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


CONFIG_FLAGS = (
    ConfigFlag("servers", int, "server ranks, placed after the workers (default 1)"),
    ConfigFlag("mode", str, "sync (default) or async", MODES),
    ConfigFlag(
        "placement", str, "sync: optimizer on the servers (default) or a mirror", PLACEMENTS
    ),
    ConfigFlag("mirror_lag", int, "mirror: steps a mirror may lag the workers (default 2)"),
    ConfigFlag("overlap", int, "sync: average gradients during backward (default 1; 0: at step)"),
    ConfigFlag("bucket_bytes", int, "overlap: bytes of gradient per bucket (default 1048576)"),
    ConfigFlag("strategy", str, "recovery strategy for server deaths (default none)", STRATEGIES),
    ConfigFlag("checkpoint_every", int, "checkpoint: snapshot every N updates (default 100)"),
    ConfigFlag("checkpoint_dir", str, "checkpoint: snapshots go here (RUN_DIR/checkpoints)"),
    ConfigFlag("async_checkpoint", int, "checkpoint: write in the background", None, True),
    ConfigFlag("chain_length", int, "chain: servers per shard (default 3)"),
    ConfigFlag("chain_ack", str, "chain: commit at the tail (default) or next server", CHAIN_ACKS),
    ConfigFlag("replicate_every", int, "chain: forward updates down the chain every N (default 1)"),
    ConfigFlag("stale_policy", str, "stateless: how logged gradients are applied", STALE_POLICIES),
    ConfigFlag("max_staleness", int, "stateless: wait after K logged gradients (0: never)"),
    ConfigFlag("respawn_workers", int, "replace dead workers with spawned ranks", None, True),
    ConfigFlag("down_for", float, "seconds a dead rank stays down before its replacement"),
    ConfigFlag("resume", int, "start from the newest valid snapshot, if any", None, True),
    ConfigFlag("seed", int, "base seed (default 0); also seeds --random-kills"),
    ConfigFlag(
        "deterministic", int, "torch deterministic algorithms; warn what still varies", None, True
    ),
    ConfigFlag("timeout", float, "seconds any single wait may take (default 300)"),
)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add every :data:`CONFIG_FLAGS` flag (default ``None``: keep the environment's value)."""
    for f in CONFIG_FLAGS:
        if f.switch:
            parser.add_argument(f.flag, dest=f.field, action="store_const", const=1, help=f.help)
        else:
            parser.add_argument(
                f.flag, dest=f.field, type=f.kind, choices=f.choices, default=None, help=f.help
            )


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The Config fields the command line set (``None`` for flags left out)."""
    return {f.field: getattr(args, f.field) for f in CONFIG_FLAGS}


def job_environment(
    environ: Mapping[str, str],
    overrides: Mapping[str, Any],
    *,
    workers: int,
    kills: Sequence[KillSpec] | None = None,
    steps: int | None = None,
    duration: float | None = None,
) -> tuple[Config, dict[str, str]]:
    """The job's ``FTMPI_*`` variables: the caller's, with ``overrides`` (and ``kills``, if
    given, as ``FTMPI_KILL``) on top; and the Config the ranks will build from them.

    Raises :class:`ConfigError` for a bad value or combination, a world too small for the
    servers, or a kill naming a rank or shard that does not exist or due after the run's end
    (``steps``/``duration``: the run's length, when known).
    """
    if workers < 1:
        raise ConfigError(f"-np {workers}: at least one worker rank is needed; use -np 1 or more")
    env = {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)}
    for name, value in overrides.items():
        if value is not None:
            env[ENV_PREFIX + name.upper()] = str(value)
    if kills is not None:
        env[ENV_PREFIX + "KILL"] = format_schedule(list(kills))
    config = Config.from_env(env)
    config.check_world(workers + config.servers)
    _check_kills(config, workers=workers, steps=steps, duration=duration)
    return config, env


def _check_kills(
    config: Config, *, workers: int, steps: int | None, duration: float | None
) -> None:
    updates = None if steps is None else server_updates(config, workers=workers, steps=steps)
    try:
        check_schedule(
            parse_schedule(config.kill),
            workers=workers,
            servers=config.servers,
            shards=config.num_shards,
            steps=steps,
            updates=updates,
            duration=duration,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def server_updates(config: Config, *, workers: int, steps: int) -> int:
    """Updates each server applies in a run of ``steps`` worker steps."""
    return steps * workers if config.mode == "async" else steps
