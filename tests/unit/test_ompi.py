"""ftmpi.ompi without an Open MPI library: no ULFM, and a fence skip that cannot be set says so
(naming what happens without it) instead of failing silently."""

from __future__ import annotations

import ctypes

from ftmpi import ompi


def _no_mpi() -> list[ctypes.CDLL]:
    # the C library alone (not the process's global scope, which holds libmpi once an
    # earlier test imported mpi4py): no MPI symbol is found in it
    return [ctypes.CDLL("libc.so.6")]


def test_an_mpi_without_the_ft_variable_has_no_ulfm(monkeypatch):
    monkeypatch.setattr(ompi, "libmpi", _no_mpi)
    assert ompi.ft_enabled() is False


def test_a_fence_skip_that_cannot_be_set_is_reported(monkeypatch, capsys):
    monkeypatch.setattr(ompi, "libmpi", _no_mpi)
    assert ompi.skip_finalize_fence("worker 0") is False
    err = capsys.readouterr().err
    assert "worker 0: could not set Open MPI's ompi_async_mpi_finalize" in err
    assert "MPI_Finalize will run its runtime fence" in err
