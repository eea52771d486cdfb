"""ftmpi.guards.failures: the one place a recovery's own MPI calls (Shrink, Split,
Split_type, Spawn, Merge, Agree) turn a peer's death into PeerFailure, which restarts the
recovery; other MPI errors are not disguised as deaths."""

from __future__ import annotations

import pytest
from mpi4py import MPI

from ftmpi.guards import FAILURE_CLASSES, failures
from ftmpi.wire import PeerFailure


@pytest.mark.parametrize("error_class", sorted(FAILURE_CLASSES))
def test_a_process_failure_or_revoke_becomes_peer_failure(error_class):
    with pytest.raises(PeerFailure) as err, failures("shrinking the world"):
        raise MPI.Exception(error_class)
    assert err.value.error_class == error_class
    assert "shrinking the world" in str(err.value)
    assert isinstance(err.value.__cause__, MPI.Exception)


def test_any_other_mpi_error_propagates_unchanged():
    with pytest.raises(MPI.Exception) as err, failures("spawning replacements"):
        raise MPI.Exception(MPI.ERR_ARG)
    assert not isinstance(err.value, PeerFailure)
    assert err.value.Get_error_class() == MPI.ERR_ARG


def test_the_classes_are_ulfms():
    assert {MPI.ERR_PROC_FAILED, MPI.ERR_PROC_FAILED_PENDING, MPI.ERR_REVOKED} == FAILURE_CLASSES
