"""ftmpi.wire.wait_all under both polling profiles: a message that is there is seen at once,
and a wait nothing answers ends at its timeout with CommTimeout (a patient wait included)."""

from __future__ import annotations

import json
import subprocess
import sys

PROG = """
import json, time
import numpy as np
from mpi4py import MPI
from ftmpi import wire
comm = MPI.COMM_SELF
out = {}
for name in ("URGENT", "PATIENT"):
    polling = getattr(wire, name)
    buf = np.zeros(4, dtype=np.int64)
    send = comm.Isend(np.arange(4, dtype=np.int64), dest=0, tag=5)
    recv = comm.Irecv(buf, source=0, tag=5)
    t0 = time.monotonic()
    wire.wait_all([send, recv], 5.0, "a message to itself", polling)
    seen = time.monotonic() - t0
    req = comm.Irecv(np.zeros(1), source=0, tag=6)  # nobody sends this
    t0 = time.monotonic()
    try:
        wire.wait_all([req], 0.5, "a message nobody sends", polling)
        error = None
    except wire.CommTimeout as exc:
        error = str(exc)
    out[name] = {"received": buf.tolist(), "seen_s": seen, "waited_s": time.monotonic() - t0,
                 "error": error}
print(json.dumps(out))
"""


def test_both_profiles_see_a_message_at_once_and_time_out_on_silence():
    res = subprocess.run(
        [sys.executable, "-c", PROG], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for name in ("URGENT", "PATIENT"):
        r = out[name]
        assert r["received"] == [0, 1, 2, 3], name
        assert r["seen_s"] < 0.5, (name, r)
        assert r["error"] == "a message nobody sends: no completion within 0.5 s", (name, r)
        assert 0.5 <= r["waited_s"] < 3.0, (name, r)
