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


def test_world_check():
    assert Config.from_env({}, servers=2).check_world(5) == 3
    assert Config.from_env({}, servers=0).check_world(1) == 1
    with pytest.raises(ConfigError, match=r"servers=4 leaves 0 worker rank\(s\) in a world of 4"):
        Config.from_env({}, servers=4).check_world(4)
    with pytest.raises(ConfigError, match="launch at least 6 ranks"):
        Config.from_env({}, servers=5).check_world(3)
