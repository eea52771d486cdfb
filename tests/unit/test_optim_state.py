from __future__ import annotations

import numpy as np
import pytest
import torch

from ftmpi.optim_state import (
    apply_hparams,
    build_optimizer,
    class_path,
    concat_segments,
    group_hparams,
    import_optimizer_class,
    load_state_entries,
    pack_tensors,
    state_entries,
    table_segments,
    tensor_segments,
    unpack_tensors,
)


def test_pack_unpack_round_trip_all_dtypes():
    tensors = [
        ("a", torch.randn(3, 4)),
        ("b", torch.arange(5, dtype=torch.int64)),
        ("c", torch.tensor(2.5, dtype=torch.float64)),
        ("d", torch.randn(2).to(torch.bfloat16)),
        ("e", torch.empty(0, 3)),
    ]
    table, buf = pack_tensors(tensors)
    out = unpack_tensors(table, buf)
    for name, t in tensors:
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert torch.equal(out[name], t)


def test_segments_are_views_and_land_where_the_table_says():
    """A state transfer sends the weights and each state tensor in place; the receiver splits
    its one buffer into the same segments and unpacks without copying."""
    weights = np.arange(7, dtype=np.float32)
    m, v = torch.randn(3), torch.arange(4, dtype=torch.int64)
    table, views = tensor_segments([("m", m), ("v", v)])
    assert views[0].ctypes.data == m.data_ptr() and views[1].ctypes.data == v.data_ptr()
    sent = [weights, *views]
    buf = concat_segments(sent)  # what arrives, byte for byte
    assert buf.nbytes == weights.nbytes + 3 * 4 + 4 * 8
    got = table_segments(table, buf, lead=weights.nbytes)
    assert [g.nbytes for g in got] == [s.nbytes for s in sent]
    assert all(np.array_equal(g, s.view(np.uint8)) for g, s in zip(got, sent, strict=True))
    out = unpack_tensors(table, buf[weights.nbytes :], copy=False)
    assert torch.equal(out["m"], m) and torch.equal(out["v"], v)
    out["m"].zero_()  # shares the received buffer: no copy was made
    assert not buf[weights.nbytes : weights.nbytes + 12].any()


def test_unpack_copies_a_read_only_buffer():
    table, buf = pack_tensors([("a", torch.randn(4))])
    buf.flags.writeable = False  # e.g. a snapshot read from disk
    out = unpack_tensors(table, buf, copy=False)
    out["a"].zero_()
    assert buf.any()


def test_unpack_rejects_a_table_that_does_not_fit():
    table, buf = pack_tensors([("a", torch.randn(8))])
    with pytest.raises(ValueError, match="does not fit"):
        unpack_tensors(table, buf[:-1])


def test_import_optimizer_class_refuses_non_optimizers():
    assert import_optimizer_class(class_path(torch.optim.AdamW)) is torch.optim.AdamW
    with pytest.raises(TypeError, match=r"not a torch\.optim\.Optimizer subclass"):
        import_optimizer_class("os:system")


def test_build_keeps_group_indices_and_hyperparameters():
    w = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
    user = torch.optim.Adam(
        [{"params": [w[0]], "lr": 0.1}, {"params": w[1:], "lr": 0.2, "betas": (0.8, 0.9)}]
    )
    groups = [group_hparams(g) for g in user.param_groups]
    # this shard holds only the second group's parameters
    opt = build_optimizer(class_path(torch.optim.Adam), groups, [[], w[1:]])
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0]["lr"] == 0.2 and opt.param_groups[0]["betas"] == (0.8, 0.9)
    groups[1]["lr"] = 0.05
    apply_hparams(opt, groups)
    assert opt.param_groups[0]["lr"] == 0.05


def test_state_transfer_reproduces_the_next_step_exactly():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(10))
    opt = torch.optim.Adam([p], lr=0.01)
    for _ in range(3):
        p.grad = torch.randn(10)
        opt.step()
    tensors, scalars = state_entries(opt, {p: "w"})
    table, buf = pack_tensors(tensors)
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.Adam([q], lr=0.01)
    load_state_entries(opt2, {"w": q}, unpack_tensors(table, np.asarray(buf)), scalars)
    g = torch.randn(10)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p, q)
