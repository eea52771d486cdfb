"""Kill schedules: parsing and checking errors, random schedules, what a relaunch still runs."""

from __future__ import annotations

import json

import pytest

from ftmpi.events import read_events
from ftmpi.faults import KillSpec, check_schedule, format_schedule, parse_schedule
from launch.kills import (
    injected_in,
    kill_events,
    kill_flags_text,
    log_injected,
    logged_kills,
    parse_kill_flags,
    random_schedule,
    remaining_schedule,
)


def test_head_and_tail_roles_parse_and_round_trip():
    specs = parse_schedule("head:1@step=20, tail@2.5s,server:3@step=7")
    assert specs == [
        KillSpec("head", 1, step=20),
        KillSpec("tail", 0, seconds=2.5),
        KillSpec("server", 3, step=7),
    ]
    assert parse_schedule(format_schedule(specs)) == specs


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("disk:0@step=5", "unknown role 'disk'; use one of"),
        ("Server:0@step=5", "unknown role 'Server'"),
        ("server:x@10s", "index 'x' is not a whole number"),
        ("server:-1@10s", "index '-1' is not a whole number"),
        ("server:0@step=0", "step must be >= 1, got step=0"),
        ("server:0@step=-3", "step must be >= 1"),
        ("server:0@-5s", "time '-5s' is negative"),
        ("server:0@soon", "WHEN 'soon' is neither step=N"),
        ("server:0@30", "WHEN '30' is neither"),
        ("server:0@step=2.5", "WHEN 'step=2.5' is neither"),
        ("server:0@", "WHEN '' is neither"),
        ("server:0", "is not ROLE[:INDEX]@step=N"),
    ],
)
def test_malformed_specs_name_the_part_that_is_wrong(text, message):
    with pytest.raises(ValueError, match="kill spec") as info:
        parse_schedule(text)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("text", "kw", "message"),
    [
        ("server:2@step=5", {}, "there are 2 server rank(s), indices 0..1"),
        ("worker:2@step=5", {}, "there are 2 worker rank(s)"),
        ("head:1@step=5", {"shards": 1}, "there are 1 shard(s), indices 0..0"),
        ("tail:2@step=5", {}, "there are 2 shard(s)"),
        ("worker:0@step=40", {"steps": 40}, "step=40 is not before the run's end at 40 steps"),
        ("server:0@step=90", {"steps": 40, "updates": 80}, "end at 80 updates per server"),
        ("server:0@30s", {"duration": 30}, "30s is not before the run's end at 30 s"),
    ],
)
def test_check_schedule_refuses_impossible_kills(text, kw, message):
    with pytest.raises(ValueError) as info:
        check_schedule(parse_schedule(text), workers=2, servers=2, **kw)
    assert message in str(info.value)


def test_check_schedule_accepts_kills_within_the_run():
    check_schedule(
        parse_schedule("head:1@step=79,worker:1@step=39,server:0@29s"),
        workers=2,
        servers=2,
        steps=40,
        updates=80,
        duration=30,
    )


def test_kill_flags_name_the_flag():
    assert parse_kill_flags(["server:0@step=5", "worker:1@3s,tail@step=2"]) == parse_schedule(
        "server:0@step=5,worker:1@3s,tail@step=2"
    )
    with pytest.raises(ValueError, match=r"--kill server@later: kill spec"):
        parse_kill_flags(["server@later"])


def test_random_schedule_is_seeded_in_range_and_in_time_order():
    kw = {"workers": 3, "servers": 2, "steps": 50}
    a = random_schedule(6, 11, **kw)
    assert a == random_schedule(6, 11, **kw)
    assert a != random_schedule(6, 12, **kw)
    assert len(a) == 6 and [s.step for s in a] == sorted(s.step for s in a)
    check_schedule(a, workers=3, servers=2, steps=50)
    killed_workers = [s.index for s in a if s.role == "worker"]
    assert len(killed_workers) == len(set(killed_workers)) <= 2  # one worker always survives
    assert parse_kill_flags(kill_flags_text(a).split(" ")[1::2]) == a


def test_random_schedule_in_seconds():
    specs = random_schedule(4, 0, workers=2, servers=1, duration=10)
    assert all(s.seconds is not None and 0 <= s.seconds < 10 for s in specs)


@pytest.mark.parametrize(
    ("count", "kw", "message"),
    [
        (2, {}, "needs the run's length"),
        (-1, {"steps": 10}, "is negative"),
        (2, {"steps": 1}, "leaves no step to kill at"),
        (2, {"steps": 10, "servers": 0, "workers": 2}, "no rank is left to kill"),
    ],
)
def test_random_schedule_errors(count, kw, message):
    kw = {"workers": 2, "servers": 1, **kw}
    with pytest.raises(ValueError, match=message):
        random_schedule(count, 0, **kw)


def test_remaining_schedule_drops_fired_and_past_kills_once_each():
    schedule = parse_schedule(
        "server:0@step=20,server:0@step=20,worker:1@5s,worker:0@60s,head@step=9"
    )
    fired = parse_schedule("server:0@step=20,server:3@step=9")
    left = remaining_schedule(schedule, fired, job_start=100.0, now=110.0)
    # one of the two identical kills fired; 5s is past; head@step=9 fired as server 3
    assert left == parse_schedule("server:0@step=20,worker:0@60s")


def test_injected_lines_become_kill_events_counted_once(tmp_path):
    line = "ftmpi: injected failure: worker:1@30s (by time) (pid 12)\n"
    assert injected_in(line) == (KillSpec("worker", 1, seconds=30.0), 12)
    assert injected_in("something else") is None
    assert logged_kills(str(tmp_path), 0, 1e12) == []  # no event log at all
    assert log_injected(str(tmp_path), line) == KillSpec("worker", 1, seconds=30.0)
    assert log_injected(str(tmp_path), "ftmpi: other") is None
    events = [
        {"time": 10.0, "event": "kill", "spec": "server:0@step=20", "pid": 7},
        {"time": 10.1, "event": "kill", "spec": "server:0@step=20", "pid": 7},  # rank + launcher
        {"time": 11.0, "event": "kill", "role": "worker", "index": 1, "step": 4},
        {"time": 11.5, "event": "failure_detected"},
        {"time": 99.0, "event": "kill", "spec": "server:1@step=3"},  # a later attempt
    ]
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write("".join(json.dumps(e) + "\n" for e in events))
    assert logged_kills(str(tmp_path), 5.0, 50.0) == parse_schedule(
        "server:0@step=20,worker:1@step=4"
    )
    assert logged_kills(str(tmp_path), 20.0, 50.0) == []
    assert len(kill_events(read_events(str(tmp_path)))) == 4
