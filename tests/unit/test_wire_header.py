"""The header's kind is a ftmpi.wire.Kind once decoded, and a header of no known kind is a
clear error naming the value (and the bytes that follow it, for the receiver to drain)."""

from __future__ import annotations

import json
import subprocess
import sys

PROG = """
import json
import numpy as np
from mpi4py import MPI
from ftmpi import wire
out = {}
h = wire.Header(wire.Kind.STATE_SIZE, 5, 7, 1, 2, 3, 0, state_nbytes=4096)
back = wire.Header.from_array(h.array())
out["kind"] = type(back.kind).__name__ + "." + back.kind.name
out["same"] = back == h
raw = h.array()
raw[0] = 99
raw[6] = 128
try:
    wire.Header.from_array(raw)
    out["error"] = None
except wire.UnknownKind as exc:
    out["error"] = str(exc)
    out["nbytes"] = exc.nbytes
comm = MPI.COMM_SELF
send = comm.Isend(raw, dest=0, tag=wire.TAG_HEADER)
try:
    wire.recv_header(comm, 0, tag=wire.TAG_HEADER, timeout=5, what="a header")
    out["received_error"] = None
except wire.UnknownKind as exc:
    out["received_error"] = str(exc)
send.Wait()
out["values"] = sorted(k.value for k in wire.Kind) == list(range(1, len(wire.Kind) + 1))
print(json.dumps(out))
"""


def test_kinds_decode_typed_and_an_unknown_kind_is_named():
    res = subprocess.run(
        [sys.executable, "-c", PROG], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["kind"] == "Kind.STATE_SIZE" and out["same"], out
    assert out["error"] == "unknown message kind 99 (128 payload bytes follow)", out
    assert out["nbytes"] == 128, out
    assert out["received_error"] == "unknown message kind 99 from rank 0 (128 payload bytes follow)"
    assert out["values"], out  # one value per kind, none reused
