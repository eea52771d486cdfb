"""Which nodes each attempt of a multi-node job runs on: hostfiles, spares, lost nodes, and the
probe that finds nodes no longer reachable."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from launch.nodes import (
    NodeError,
    NodePlan,
    parse_hostfile,
    parse_hosts,
    tasks_per_node,
    unreachable,
)


def test_hostfile_and_host_list(tmp_path: Path) -> None:
    hf = tmp_path / "hosts"
    hf.write_text("# cluster\nn1 slots=2\nn2 slots=4 max_slots=8\n\nn3\n")
    assert [(n.name, n.slots) for n in parse_hostfile(str(hf))] == [("n1", 2), ("n2", 4), ("n3", 1)]
    assert [(n.name, n.slots) for n in parse_hosts("a:2,b")] == [("a", 2), ("b", 1)]


@pytest.mark.parametrize(
    ("text", "match"),
    [("n1 slots=0\n", "slots=0"), ("n1\nn1\n", "more than once"), ("# none\n", "names no node")],
)
def test_a_bad_hostfile_is_named(tmp_path: Path, text: str, match: str) -> None:
    hf = tmp_path / "hosts"
    hf.write_text(text)
    with pytest.raises(NodeError, match=match):
        parse_hostfile(str(hf))
    with pytest.raises(NodeError, match="cannot read"):
        parse_hostfile(str(tmp_path / "missing"))


def test_spares_start_empty_and_take_a_lost_nodes_place() -> None:
    plan = NodePlan(parse_hosts("n1:2,n2:2,n3:2,n4:2"), spares=["n4"])
    assert [n.name for n in plan.ranked] == ["n1", "n2", "n3"]
    assert plan.free_spares == ["n4"]
    assert plan.lose(["n2", "n9", "n2"]) == ["n2"]
    assert [n.name for n in plan.ranked] == ["n1", "n3", "n4"]
    assert plan.free_spares == []
    assert plan.hostfile_text() == "n1 slots=2\nn3 slots=2\nn4 slots=2\n"
    plan.lose(["n3"])
    assert [n.name for n in plan.ranked] == ["n1", "n4"]


def test_a_lost_spare_is_not_a_spare_any_more() -> None:
    plan = NodePlan(parse_hosts("n1,n2,n3"), spares=["n3"])
    plan.lose(["n3"])
    assert plan.free_spares == [] and [n.name for n in plan.ranked] == ["n1", "n2"]


def test_spares_must_be_listed_and_leave_a_node() -> None:
    with pytest.raises(NodeError, match="not in the hostfile"):
        NodePlan(parse_hosts("n1,n2"), spares=["n5"])
    with pytest.raises(NodeError, match="every node is a spare"):
        NodePlan(parse_hosts("n1"), spares=["n1"])


def test_the_probe_finds_nodes_that_do_not_answer_within_its_deadline(tmp_path: Path) -> None:
    agent = tmp_path / "agent"
    # answers for "up", fails at once for "down", never answers for "hung"
    agent.write_text(
        '#!/bin/sh\ncase "$1" in up) exit 0;; down) exit 255;; hung) exec sleep 60;; esac\n'
    )
    agent.chmod(0o755)
    t0 = time.monotonic()
    dead = unreachable(["up", "down", "hung"], {"PRTE_MCA_plm_ssh_agent": str(agent)}, timeout=1)
    assert dead == ["down", "hung"]
    assert time.monotonic() - t0 < 5


def test_slurm_tasks_per_node_expands_repeats() -> None:
    assert tasks_per_node("2(x3),1", 4) == [2, 2, 2, 1]
    assert tasks_per_node("4", 1) == [4]
    assert tasks_per_node("2(x2)", 3) == [1, 1, 1]  # does not match the nodes: one each
    assert tasks_per_node("", 2) == [1, 1]


def test_the_rankfile_keeps_the_spares_free() -> None:
    plan = NodePlan(parse_hosts("n1:2,n2:2,n3:2,n4:2"), spares=["n4"])
    assert plan.rankfile_text(5).splitlines() == [
        "rank 0=n1 slot=0",
        "rank 1=n2 slot=0",
        "rank 2=n3 slot=0",
        "rank 3=n1 slot=1",
        "rank 4=n2 slot=1",
    ]
    plan.lose(["n1"])  # the spare now takes ranks; nothing is held back
    assert "n4" in plan.rankfile_text(3) and plan.free_spares == []


def test_the_probe_decides_which_named_node_is_lost(tmp_path: Path) -> None:
    from launch.outcome import NODE_LOST, Outcome
    from launch.restart import _find_lost_nodes

    agent = tmp_path / "agent"
    agent.write_text('#!/bin/sh\ncase "$1" in n3) exit 255;; *) exit 0;; esac\n')
    agent.chmod(0o755)
    env = {"PRTE_MCA_plm_ssh_agent": str(agent)}
    named_n2 = Outcome(NODE_LOST, "node n2 was lost: ...", nodes=("n2",))
    plan = NodePlan(parse_hosts("n1,n2,n3"))
    out = _find_lost_nodes(plan, named_n2, env)  # n2's daemon crashed, n2 answers; n3 is gone
    assert plan.lost == ["n3"] and out.nodes == ("n3",) and "node n3 was lost" in out.cause
    nothing = tmp_path / "nothing"
    nothing.write_text("#!/bin/sh\nexit 255\n")
    nothing.chmod(0o755)
    plan = NodePlan(parse_hosts("n1,n2,n3"))
    out = _find_lost_nodes(plan, named_n2, {"PRTE_MCA_plm_ssh_agent": str(nothing)})
    assert plan.lost == ["n2"] and out is named_n2  # no probe works: the runtime's report
