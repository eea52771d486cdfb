from __future__ import annotations

import pytest

from ftmpi.config import Config, ConfigError


def test_defaults():
    c = Config.from_env({})
    assert (c.servers, c.mode, c.strategy, c.backend) == (1, "sync", "none", "auto")


def test_env_is_read_and_keywords_win():
    env = {"FTMPI_SERVERS": "3", "FTMPI_MODE": "async", "FTMPI_TIMEOUT": "12.5"}
    c = Config.from_env(env)
    assert (c.servers, c.mode, c.timeout) == (3, "async", 12.5)
    c = Config.from_env(env, servers=2, mode=None)
    assert (c.servers, c.mode) == (2, "async")


def test_unknown_ftmpi_variables_are_kept_for_the_manifest():
    c = Config.from_env({"FTMPI_SOMETHING": "x", "PATH": "/bin"})
    assert c.extra == {"FTMPI_SOMETHING": "x"}


def test_env_round_trip():
    c = Config.from_env({}, servers=2, mode="async", seed=7)
    assert Config.from_env(c.env()) == c


@pytest.mark.parametrize(
    ("kwargs", "env", "message"),
    [
        ({}, {"FTMPI_SERVERS": "two"}, "FTMPI_SERVERS'two' is not a valid int"),
        ({"servers": 1.5}, {}, "is not a valid int"),
        ({"servers": -1}, {}, "servers=-1 is negative"),
        ({"mode": "bulk"}, {}, "mode='bulk' is not one of ['sync', 'async']"),
        ({"strategy": "magic"}, {}, "strategy='magic' is not one of"),
        ({"backend": "nccl"}, {}, "backend='nccl' is not one of"),
        ({"timeout": 0}, {}, "timeout=0.0 must be a positive number of seconds"),
        ({"chunk_bytes": 10}, {}, "chunk_bytes=10 is too small"),
        ({"server_threads": 0}, {}, "server_threads=0 must be >= 1"),
        ({"servers": 0, "mode": "async"}, {}, "mode='async' needs parameter servers"),
        ({"strategy": "chain", "servers": 2}, {}, "needs a multiple of 3 servers"),
        ({"chain_ack": "head"}, {}, "chain_ack='head' is not one of"),
        ({"strategy": "chain", "servers": 3, "replicate_every": 5}, {}, "needs chain_ack='next'"),
        ({"stale_policy": "max"}, {}, "stale_policy='max' is not one of"),
        ({"max_staleness": -1}, {}, "max_staleness=-1 must be >= 0"),
        ({"respawn_workers": 2}, {}, "respawn_workers=2 must be 0 or 1"),
        ({"strategy": "checkpoint"}, {}, "needs checkpoint_dir or run_dir"),
        ({"kill": "disk@step=3"}, {}, "kill spec 'disk@step=3'"),
        ({"down_for": -1}, {}, "down_for=-1.0 is negative"),
        ({"nonsense": 1}, {}, "unknown ftmpi option(s) ['nonsense']"),
    ],
)
def test_bad_values_are_named(kwargs, env, message):
    with pytest.raises(ConfigError) as err:
        Config.from_env(env, **kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FTMPI_ASYNC_CHECKPOINT": "2"}, "async_checkpoint=2 must be 0 or 1"),
        ({"FTMPI_RESUME": "2"}, "resume=2 must be 0 or 1"),
        ({"FTMPI_DETERMINISTIC": "-1"}, "deterministic=-1 must be 0 or 1"),
        ({"FTMPI_TIMEOUT": "inf"}, "timeout=inf must be a positive number of seconds"),
        ({"FTMPI_TIMEOUT": "nan"}, "timeout=nan must be a positive number of seconds"),
        ({"FTMPI_SERVER_IDLE_TIMEOUT": "-5"}, "server_idle_timeout=-5.0 must be a positive"),
        ({"FTMPI_DOWN_FOR": "nan"}, "down_for=nan is negative or not finite"),
        ({"FTMPI_DOWN_FOR": "inf"}, "down_for=inf is negative or not finite"),
        ({"FTMPI_CHECKPOINT_EVERY": "-10"}, "checkpoint_every=-10 must be >= 1"),
        ({"FTMPI_CHECKPOINT_KEEP": "0"}, "checkpoint_keep=0 must be >= 1"),
        ({"FTMPI_CHAIN_LENGTH": "0"}, "chain_length=0 must be >= 1"),
        (
            {"FTMPI_STRATEGY": "chain", "FTMPI_SERVERS": "3", "FTMPI_CHAIN_LENGTH": "4"},
            "needs a multiple of 4 servers, not servers=3",
        ),
        ({"FTMPI_REPLICATE_EVERY": "0"}, "replicate_every=0 must be >= 1"),
        ({"FTMPI_STALE_LOG_BYTES": "-1"}, "stale_log_bytes=-1 must be >= 0"),
        ({"FTMPI_CHUNK_BYTES": "1e6"}, "is not a valid int for option 'chunk_bytes'"),
        ({"FTMPI_SERVERS": ""}, "is not a valid int for option 'servers'"),
        ({"FTMPI_MODE": "SYNC"}, "mode='SYNC' is not one of"),
        ({"FTMPI_KILL": "server:0@step=0"}, "step must be >= 1"),
        ({"FTMPI_KILL": "server:-1@step=3"}, "index '-1' is not a whole number"),
        ({"FTMPI_KILL": "server:0@-3s"}, "time '-3s' is negative"),
        ({"FTMPI_FAILPOINTS": "nowhere@server:0"}, "unknown place 'nowhere'"),
        ({"FTMPI_FAILPOINTS": "apply@disk"}, "unknown role 'disk'"),
        ({"FTMPI_FAILPOINTS": "apply@server:0#0"}, "#HIT must be >= 1"),
    ],
)
def test_bad_variables_are_named(env, message):
    """Wrong types, ranges and combinations in FTMPI_* variables (the keyword forms above)."""
    with pytest.raises(ConfigError) as err:
        Config.from_env(env)
    assert message in str(err.value)


def test_world_check():
    assert Config.from_env({}, servers=2).check_world(5) == 3
    assert Config.from_env({}, servers=0).check_world(1) == 1
    with pytest.raises(ConfigError, match=r"servers=4 leaves 0 worker rank\(s\) in a world of 4"):
        Config.from_env({}, servers=4).check_world(4)
    with pytest.raises(ConfigError, match="launch at least 6 ranks"):
        Config.from_env({}, servers=5).check_world(3)
