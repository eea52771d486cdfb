"""Bucket planning for gradient averaging during backward, and a node emptied by a failure."""

from __future__ import annotations

from ftmpi.buckets import plan_buckets
from ftmpi.membership import _emptied_nodes


def test_buckets_are_consecutive_runs_started_from_the_last_parameters():
    # slots in the buffer's order; backward's order is the parameters' (slot i is param i)
    runs = plan_buckets([400, 400, 400, 100, 100], [0, 1, 2, 3, 4], 800)
    assert runs == [[2, 3, 4], [0, 1]]


def test_a_slot_larger_than_a_bucket_is_alone():
    assert plan_buckets([100, 5000, 100], [0, 1, 2], 1000) == [[2], [1], [0]]


def test_start_order_follows_the_parameters_not_the_buffer():
    # a sharded buffer puts parameter 3 first: its run starts first
    assert plan_buckets([100, 100, 100, 100], [3, 0, 1, 2], 200) == [[0, 1], [2, 3]]


def test_a_node_whose_every_rank_died_is_emptied():
    nodes = ["n1", "n2", "n1", "n3", "n2"]
    assert _emptied_nodes(nodes, {1: 0, 4: 1}) == ["n1", "n3"]
    assert _emptied_nodes(nodes, {0: 0, 1: 1, 3: 2}) == []
    assert _emptied_nodes(["n1", "n1", "n1"], {0: 0}) == []  # one node: nothing to tell
