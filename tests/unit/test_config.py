from __future__ import annotations

import pytest

from ftmpi.config import BackendName, ChainAck, Config, ConfigError, Mode, StalePolicy
from ftmpi.strategies import StrategyName


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


def test_choices_are_enums_and_flags_are_bools():
    c = Config.from_env(
        {"FTMPI_STRATEGY": "chain", "FTMPI_SERVERS": "3", "FTMPI_RESUME": "true"},
        deterministic=1,
        respawn_workers=False,
        chain_ack="next",
        stale_policy="mean",
        backend="mpi",
    )
    assert type(c.strategy) is StrategyName and c.strategy == "chain"
    assert (type(c.mode), type(c.chain_ack), type(c.stale_policy), type(c.backend)) == (
        Mode,
        ChainAck,
        StalePolicy,
        BackendName,
    )
    assert c.mode == Mode.SYNC == "sync" and c.chain_ack == "next" and c.backend == "mpi"
    assert (c.resume, c.deterministic, c.respawn_workers, c.async_checkpoint) == (
        True,
        True,
        False,
        False,
    )
    for name in ("resume", "deterministic", "respawn_workers", "async_checkpoint"):
        assert type(getattr(c, name)) is bool
    # built directly, the same types
    d = Config(strategy="checkpoint", resume=1, run_dir="/r")  # type: ignore[arg-type]
    assert type(d.strategy) is StrategyName and d.resume is True


@pytest.mark.parametrize(
    ("raw", "value"),
    [("1", True), ("0", False), ("true", True), ("False", False), (" TRUE ", True)],
)
def test_flags_read_0_1_true_false(raw, value):
    assert Config.from_env({"FTMPI_RESUME": raw}).resume is value


def test_env_writes_flags_as_0_1_and_choices_as_their_names_and_round_trips():
    c = Config.from_env(
        {},
        servers=3,
        strategy="chain+stateless",
        chain_ack="next",
        replicate_every=4,
        stale_policy="staleness-weighted",
        mode="async",
        backend="horovod",
        resume=True,
        deterministic=True,
        respawn_workers=True,
        async_checkpoint=True,
        run_dir="/r",
    )
    env = c.env()
    assert env["FTMPI_RESUME"] == env["FTMPI_DETERMINISTIC"] == "1"
    assert env["FTMPI_STRATEGY"] == "chain+stateless" and env["FTMPI_STALE_POLICY"] == (
        "staleness-weighted"
    )
    assert env["FTMPI_MODE"] == "async" and env["FTMPI_BACKEND"] == "horovod"
    back = Config.from_env(env)
    assert back == c
    assert Config.from_env(Config.from_env({}).env()).env() == Config.from_env({}).env()
    assert Config.from_env({}).env()["FTMPI_RESUME"] == "0"


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
        ({"FTMPI_ASYNC_CHECKPOINT": "2"}, "FTMPI_ASYNC_CHECKPOINT='2' must be 0, 1, false or true"),
        (
            {"FTMPI_RESUME": "yes"},
            "FTMPI_RESUME='yes' must be 0, 1, false or true (option 'resume')",
        ),
        ({"FTMPI_DETERMINISTIC": "-1"}, "FTMPI_DETERMINISTIC='-1' must be 0, 1, false or true"),
        ({"FTMPI_RESPAWN_WORKERS": ""}, "FTMPI_RESPAWN_WORKERS='' must be 0, 1, false or true"),
        ({"FTMPI_MODE": "bulk"}, "mode='bulk' is not one of ['sync', 'async'] (from FTMPI_MODE)"),
        ({"FTMPI_TIMEOUT": "inf"}, "timeout=inf must be a positive number of seconds"),
        ({"FTMPI_TIMEOUT": "nan"}, "timeout=nan must be a positive number of seconds"),
        ({"FTMPI_SERVER_IDLE_TIMEOUT": "-5"}, "server_idle_timeout=-5.0 must be a positive"),
        ({"FTMPI_START_TIMEOUT": "0"}, "start_timeout=0.0 must be a positive number of seconds"),
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
        ({"FTMPI_MAX_STALENESS": "-1"}, "max_staleness=-1 must be >= 0"),
        ({"FTMPI_CHUNK_BYTES": "1e6"}, "is not a valid int for option 'chunk_bytes'"),
        ({"FTMPI_SERVERS": ""}, "is not a valid int for option 'servers'"),
        ({"FTMPI_MODE": "SYNC"}, "mode='SYNC' is not one of"),
        ({"FTMPI_KILL": "server:0@step=0"}, "step must be >= 1"),
        ({"FTMPI_KILL": "server:-1@step=3"}, "index '-1' is not a whole number"),
        ({"FTMPI_KILL": "server:0@-3s"}, "time '-3s' is negative"),
        ({"FTMPI_FAILPOINTS": "nowhere@server:0"}, "unknown place 'nowhere'"),
        ({"FTMPI_FAILPOINTS": "apply@disk"}, "unknown role 'disk'"),
        ({"FTMPI_FAILPOINTS": "starting@server:0"}, "use starting@replacement, and only that"),
        ({"FTMPI_FAILPOINTS": "apply@replacement"}, "use starting@replacement, and only that"),
        ({"FTMPI_FAILPOINTS": "apply@server:0#0"}, "#HIT must be >= 1"),
        ({"FTMPI_SPARE_NODES": "n3,,n4"}, "spare_nodes='n3,,n4': '' is not a node name"),
        ({"FTMPI_SPARE_NODES": "n3 n4"}, "'n3 n4' is not a node name; list the spare nodes'"),
        ({"FTMPI_SPARE_NODES": "n3,n4,n3"}, "names 'n3' twice; list each spare node once"),
    ],
)
def test_bad_variables_are_named(env, message):
    """Wrong types, ranges and combinations in FTMPI_* variables (the keyword forms above)."""
    with pytest.raises(ConfigError) as err:
        Config.from_env(env)
    assert message in str(err.value)


def test_spare_nodes_are_a_comma_separated_list():
    assert Config.from_env({}).spares == ()
    c = Config.from_env({"FTMPI_SPARE_NODES": " n4, node-5.cluster "})
    assert c.spares == ("n4", "node-5.cluster")
    assert Config.from_env(c.env()) == c


def test_world_check():
    assert Config.from_env({}, servers=2).check_world(5) == 3
    assert Config.from_env({}, servers=0).check_world(1) == 1
    with pytest.raises(ConfigError, match=r"servers=4 leaves 0 worker rank\(s\) in a world of 4"):
        Config.from_env({}, servers=4).check_world(4)
    with pytest.raises(ConfigError, match="launch at least 6 ranks"):
        Config.from_env({}, servers=5).check_world(3)


def test_mirror_placement_is_sync_only_and_its_lag_at_least_one():
    c = Config.from_env({"FTMPI_PLACEMENT": "mirror", "FTMPI_MIRROR_LAG": "3"})
    assert (c.placement, c.mirror_lag, c.mirrored) == ("mirror", 3, True)
    assert not Config.from_env({"FTMPI_PLACEMENT": "mirror"}, servers=0).mirrored
    with pytest.raises(ConfigError, match="placement='mirror' needs mode='sync'"):
        Config.from_env({"FTMPI_PLACEMENT": "mirror", "FTMPI_MODE": "async"})
    with pytest.raises(ConfigError, match="mirror_lag=0 must be >= 1"):
        Config.from_env({}, placement="mirror", mirror_lag=0)
    with pytest.raises(ConfigError, match="placement"):
        Config.from_env({"FTMPI_PLACEMENT": "gpu"})
