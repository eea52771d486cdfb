from __future__ import annotations

import pytest

from ftmpi.sharding import ParamInfo, Shard, plan_shards


def params(sizes):
    return [ParamInfo(f"p{i}", i % 2, (n,)) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("num_shards", [1, 2, 3, 5])
def test_every_parameter_in_exactly_one_shard_and_layout_is_contiguous(num_shards):
    ps = params([100, 7, 3000, 42, 42, 1, 900, 5])
    shards = plan_shards(ps, num_shards)
    names = [s.name for sh in shards for s in sh.slots]
    assert sorted(names) == sorted(p.name for p in ps)
    start = 0
    for sh in shards:
        assert sh.start == start
        offset = 0
        for slot in sh.slots:
            assert slot.offset == offset
            offset += slot.numel
        start += sh.numel
    assert start == sum(p.numel for p in ps)


def test_balance_is_within_one_tensor_of_the_mean():
    sizes = [512, 256, 256, 128, 128, 64, 64, 64, 32, 16]
    shards = plan_shards(params(sizes), 3)
    loads = [sh.numel for sh in shards]
    assert max(loads) - min(loads) <= max(sizes)
    assert max(loads) <= sum(sizes) / 3 + max(sizes)


def test_model_order_and_groups_are_kept_inside_a_shard():
    ps = params([10, 20, 30, 40])
    (shard,) = plan_shards(ps, 1)
    assert [(s.name, s.group) for s in shard.slots] == [(p.name, p.group) for p in ps]


def test_plan_is_deterministic_and_serialisable():
    ps = params([5, 5, 5, 9, 1])
    a, b = plan_shards(ps, 2), plan_shards(list(ps), 2)
    assert a == b
    assert [Shard.from_json(s.to_json()) for s in a] == a


def test_errors():
    with pytest.raises(ValueError, match="use at most 2 servers"):
        plan_shards(params([1, 2]), 3)
    with pytest.raises(ValueError, match="duplicated"):
        plan_shards([ParamInfo("a", 0, (1,)), ParamInfo("a", 0, (2,))], 1)
    with pytest.raises(ValueError, match="no parameters"):
        plan_shards([], 1)
