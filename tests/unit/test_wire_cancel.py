"""ftmpi.wire cancels what a failed wait leaves behind without freeing memory MPI still uses:
a request that a cancel does not complete (a send nobody has matched: MPI cannot take it back)
keeps its buffer referenced until MPI reports it complete; a cancelled receive completes at
once and keeps nothing."""

from __future__ import annotations

import json
import subprocess
import sys

PROG = """
import gc, json, weakref
import numpy as np
from mpi4py import MPI
from ftmpi import wire
comm = MPI.COMM_SELF
out = {}
payload = np.arange(1 << 18, dtype=np.float64)  # 2 MiB: sent by rendezvous, completes only
alive = weakref.ref(payload)                     # once a receive matches it
header = wire.Header(wire.Kind.PULL, 1, 0, 0, 0, 0, payload.nbytes)
try:
    wire.send(comm, 0, header, payload, tag=5, data_tag=6, chunk_bytes=1 << 20, timeout=0.3,
              what="a send nobody receives yet")
    out["error"] = None
except wire.CommTimeout as exc:
    out["error"] = str(exc)
del payload
gc.collect()
out["kept_while_pending"] = alive() is not None
if out["kept_while_pending"]:  # else its memory is gone: receiving it now would read freed memory
    out["unfinished_before"] = wire.unfinished_requests()
    head = np.zeros(wire.HEADER_LEN, dtype=np.int64)
    data = np.zeros(1 << 18, dtype=np.float64)
    MPI.Request.Waitall([comm.Irecv(head, source=0, tag=5),
                         comm.Irecv(data[: 1 << 17], source=0, tag=6),
                         comm.Irecv(data[1 << 17 :], source=0, tag=6)])
    out["intact"] = bool((data == np.arange(1 << 18)).all())
    out["unfinished_after"] = wire.unfinished_requests()
    gc.collect()
    out["released_once_complete"] = alive() is None
    try:
        wire.recv_header(comm, 0, tag=9, timeout=0.2, what="a header nobody sends")
    except wire.CommTimeout:
        pass
    out["unfinished_after_receive"] = wire.unfinished_requests()
print(json.dumps(out))
"""


def test_a_send_a_cancel_cannot_take_back_keeps_its_buffer_until_it_completes():
    res = subprocess.run(
        [sys.executable, "-c", PROG], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["error"] == "a send nobody receives yet: no completion within 0.3 s", out
    assert out["kept_while_pending"], "the buffer was released while MPI still had its send"
    assert out["unfinished_before"] == 2, out  # both chunks (the small header went eagerly)
    assert out["intact"], out  # the late receive got the bytes sent, from the kept buffer
    assert out["unfinished_after"] == 0 and out["released_once_complete"], out
    assert out["unfinished_after_receive"] == 0, out  # a cancelled receive completes at once
