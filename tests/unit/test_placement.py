"""ftmpi.placement: chains spread over the nodes, replacements on live nodes (spares first)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from ftmpi import placement
from ftmpi.placement import contiguous_chains, initial_chains, replacement_nodes, spread

pytestmark = pytest.mark.timeout(60)


def nodes_of(chains, slot_nodes):
    return [[slot_nodes[s] for s in chain] for chain in chains]


@pytest.mark.parametrize(("slots", "length"), [(0, 3), (1, 1), (3, 1), (3, 3), (6, 2), (9, 3)])
def test_on_one_node_the_chains_are_the_contiguous_slots(slots, length):
    chains = initial_chains(["vm"] * slots, length)
    assert chains == [list(range(k, k + length)) for k in range(0, slots, length)]


def test_without_chains_shard_k_is_slot_k_wherever_the_servers_are():
    assert initial_chains(["a", "a", "b", "c"], 1) == [[0], [1], [2], [3]]


def test_servers_filled_node_by_node_are_dealt_onto_distinct_nodes():
    # --map-by slot: slots 0-2 on n1, 3-5 on n2, 6-8 on n3; contiguous chains would each sit
    # on one node
    slot_nodes = ["n1"] * 3 + ["n2"] * 3 + ["n3"] * 3
    chains = initial_chains(slot_nodes, 3)
    assert chains == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert nodes_of(chains, slot_nodes) == [["n1", "n2", "n3"]] * 3


def test_a_round_robin_layout_that_is_already_spread_is_kept():
    # --map-by node with 2 workers on 3 nodes: world rank r on node r % 3, slot s is rank 2 + s
    slot_nodes = [f"n{(2 + s) % 3}" for s in range(9)]
    assert initial_chains(slot_nodes, 3) == contiguous_chains(9, 3)
    assert all(len(set(c)) == 3 for c in nodes_of(contiguous_chains(9, 3), slot_nodes))


def test_with_too_few_nodes_no_node_takes_a_whole_chain_if_it_can_be_avoided():
    # 4 of 6 slots on n1, 2 chains of 3: a chain must hold 2 replicas on n1, never 3
    slot_nodes = ["n1", "n1", "n1", "n1", "n2", "n3"]
    chains = initial_chains(slot_nodes, 3)
    assert chains == [[0, 2, 4], [1, 3, 5]]
    assert [Counter(c)["n1"] for c in nodes_of(chains, slot_nodes)] == [2, 2]


def test_any_layout_is_a_spread_partition_and_distinct_whenever_possible():
    rng = random.Random(7)
    for _ in range(500):
        length = rng.randint(1, 4)
        shards = rng.randint(1, 5)
        slot_nodes = [f"n{rng.randint(1, 4)}" for _ in range(length * shards)]
        chains = initial_chains(slot_nodes, length)
        assert sorted(s for c in chains for s in c) == list(range(length * shards))
        assert all(len(c) == length and c == sorted(c) for c in chains)
        assert spread(chains, slot_nodes), (slot_nodes, chains)
        if max(Counter(slot_nodes).values()) <= shards:
            assert all(len(set(c)) == length for c in nodes_of(chains, slot_nodes))
        assert initial_chains(list(slot_nodes), length) == chains


def test_every_process_computes_the_same_layout_whatever_its_hash_seed():
    code = (
        "import json, runpy, sys; ns = runpy.run_path(sys.argv[1]); "
        "print(json.dumps([ns['initial_chains'](['b', 'a', 'b', 'c', 'a', 'a'], 2), "
        "ns['replacement_nodes'](['b', 'a', 'c'], ['d', 'e'], [0, None, None], [['a']])]))"
    )
    answers = set()
    for seed in ("1", "2", "3"):
        done = subprocess.run(
            [sys.executable, "-c", code, placement.__file__],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONHASHSEED": seed},
            check=True,
        )
        answers.add(done.stdout)
    assert len(answers) == 1
    assert json.loads(answers.pop()) == [[[0, 4], [1, 3], [2, 5]], ["d", "e", "d"]]


def test_chain_lengths_that_do_not_divide_the_slots_are_refused():
    with pytest.raises(ValueError, match="multiple of the chain length"):
        initial_chains(["a"] * 4, 3)


def test_a_replacement_goes_to_a_spare_node_first():
    live = ["n1", "n1", "n2", "n2"]
    assert replacement_nodes(live, ["n3"], [0], [["n1", "n2"]]) == ["n3"]
    assert replacement_nodes(live, ["n3"], [None], [["n1", "n2"]]) == ["n3"]  # a worker too


def test_then_to_a_node_without_a_member_of_its_chain_however_loaded():
    live = ["n1", "n2", "n3", "n3", "n3"]
    assert replacement_nodes(live, [], [0], [["n1", "n2"]]) == ["n3"]


def test_then_to_the_least_loaded_node_and_ties_go_to_the_earliest():
    live = ["n1", "n1", "n2", "n3", "n3"]
    assert replacement_nodes(live, [], [None], [["n1"]]) == ["n2"]
    assert replacement_nodes(["n2", "n1"], [], [None], []) == ["n2"]


def test_a_node_whose_ranks_all_died_is_never_chosen():
    # n2 held the dead server and nothing else: its daemon may be gone
    live = ["n1", "n1", "n1", "n3", "n3", "n3"]
    assert replacement_nodes(live, [], [0], [["n1", "n3"]]) == ["n1"]
    assert "n2" not in replacement_nodes(live, [], [0, None, None, 0], [["n1", "n3"]])


def test_replacements_placed_together_count_each_other():
    live = ["n1", "n2", "n3"]
    # both of chain 0's dead members: one on the spare, the other off it (it holds a member)
    assert replacement_nodes(live, ["n4"], [0, 0], [["n1"]]) == ["n4", "n2"]
    # two workers and no spare: the load of the first counts for the second
    assert replacement_nodes(["n1", "n1", "n2"], [], [None, None], []) == ["n2", "n1"]
    # a spare stays preferred for workers, as long as no chain member argues against it
    assert replacement_nodes(live, ["n4"], [None, None], []) == ["n4", "n4"]


def test_with_one_node_every_replacement_goes_there():
    assert replacement_nodes(["vm"] * 5, [], [0, 1, None], [["vm", "vm"], ["vm"]]) == ["vm"] * 3


def test_nothing_to_place_on_is_an_error():
    with pytest.raises(ValueError, match="no live node"):
        replacement_nodes([], [], [None], [])
