"""The machine's limits, measured the way ftmpi moves and updates data.

- :func:`memcpy_rate`: bytes/s of ``numpy.copyto`` between two large buffers (one core);
- :func:`apply_rate`: parameters/s of ``torch.optim.SGD`` (momentum 0.9) or ``Adam`` stepping
  one flat parameter of ``numel`` elements with ``torch.set_num_threads(1)``, the server's
  setting;
- MPI point-to-point bandwidth between two ranks (this file run under ``mpirun -np 2``): rank 0
  sends a buffer to rank 1, ``unchunked`` (one ``Send``/``Recv``) and ``chunked`` (``Isend`` /
  ``Irecv`` in ``chunk_bytes`` pieces, waited with ftmpi's polling :func:`ftmpi.wire.wait_all`,
  as the data path does). With ``--spawned``, the same from rank 0 to a rank it spawns
  (``MPI_Comm_spawn`` + ``Merge``, as a replacement joins): the path a recovery's state
  transfer takes. Open MPI's shared-memory transport does not connect a spawned process to its
  parents (open-mpi/ompi#6823), so on one node that path is TCP over loopback. Rank 0 prints one
  line ``BENCH {json}``.

    mpirun -np 2 python benchmarks/limits.py --nbytes 268435456 --chunk-bytes 1048576 --spawned
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def _best_seconds(fn: Callable[[], None], repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memcpy_rate(nbytes: int, repeats: int = 5) -> float:
    """Bytes/s copied by ``numpy.copyto`` between two ``nbytes`` buffers."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    return nbytes / _best_seconds(lambda: np.copyto(dst, src), repeats)


def apply_rate(numel: int, optimizer: str = "sgd", repeats: int = 5) -> float:
    """Parameters/s of one optimizer step on a flat float32 parameter of ``numel`` elements,
    on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p = torch.nn.Parameter(torch.zeros(numel))
        p.grad = torch.full((numel,), 1e-3)
        opt = (
            torch.optim.Adam([p], lr=0.01)
            if optimizer == "adam"
            else torch.optim.SGD([p], lr=0.01, momentum=0.9)
        )
        return numel / _best_seconds(opt.step, repeats)
    finally:
        torch.set_num_threads(threads)


def cnn_step_rate(batch: int = 32, steps: int = 40) -> float:
    """Steps/s of the paper's CNN (``ftmpi.models.PaperCNN``, 10 classes) on one thread: one
    batch's forward, backward and SGD-with-momentum step, the median of ``steps`` after a warm-up.
    Times the cores, it is the most gradients/s a job of one-thread workers can compute."""
    from ftmpi.models import PaperCNN

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = PaperCNN(num_classes=10)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

        def one() -> None:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        for _ in range(4):  # warm-up (a fifth call is _best_seconds's own)
            one()
        return 1.0 / _best_seconds(one, steps)
    finally:
        torch.set_num_threads(threads)


def p2p_rates(
    comm: Any, nbytes: int, chunk_sizes: list[int], repeats: int
) -> dict[str, float] | None:
    """Bytes/s from rank 0 to rank 1 of ``comm``, unchunked and per chunk size (medians over
    ``repeats``, each timed from a barrier to the receiver's acknowledgement). Returns the rates
    on rank 0, None elsewhere."""
    from ftmpi import wire

    me = comm.Get_rank()
    buf = np.ones(nbytes, dtype=np.uint8)
    ack = np.zeros(1, dtype=np.int64)

    def once(chunk: int) -> float:
        comm.Barrier()
        t0 = time.perf_counter()
        if chunk == 0:
            if me == 0:
                comm.Send(buf, dest=1, tag=1)
            elif me == 1:
                comm.Recv(buf, source=0, tag=1)
        elif me in (0, 1):
            op = comm.Isend if me == 0 else comm.Irecv
            reqs = [op(c, 1 - me, tag=2) for c in wire.chunks(buf, chunk)]
            wire.wait_all(reqs, 600.0, "p2p benchmark")
        if me == 1:
            comm.Send(ack, dest=0, tag=3)
        elif me == 0:
            comm.Recv(ack, source=1, tag=3)
        return time.perf_counter() - t0

    rates: dict[str, float] = {}
    for chunk in [0, *chunk_sizes]:
        once(chunk)  # warm-up: registration, first touch
        secs = statistics.median(once(chunk) for _ in range(repeats))
        rates["unchunked" if chunk == 0 else f"chunked_{chunk}"] = nbytes / secs
    return rates if me == 0 else None


def spawned_rates(argv: list[str], nbytes: int, chunk_sizes: list[int], repeats: int) -> Any:
    """:func:`p2p_rates` from this process to one it spawns running this file with ``argv``
    (the child calls :func:`p2p_rates` on its side). Returns the rates."""
    from mpi4py import MPI

    child = MPI.COMM_SELF.Spawn(sys.executable, [__file__, *argv, "--child"], 1)
    merged = child.Merge(high=False)
    try:
        return p2p_rates(merged, nbytes, chunk_sizes, repeats)
    finally:
        merged.Free()
        child.Disconnect()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nbytes", type=int, default=256 << 20)
    p.add_argument("--chunk-bytes", type=int, nargs="+", default=[1 << 20])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--spawned", action="store_true", help="also to a spawned rank")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    from mpi4py import MPI

    from ftmpi import wire

    if a.child:  # the spawned receiver of spawned_rates
        parent = MPI.Comm.Get_parent()
        merged = parent.Merge(high=True)
        p2p_rates(merged, a.nbytes, a.chunk_bytes, a.repeats)
        merged.Free()
        parent.Disconnect()
        return
    world = MPI.COMM_WORLD
    rates = p2p_rates(world, a.nbytes, a.chunk_bytes, a.repeats)
    result: dict[str, Any] = {"nbytes": a.nbytes, "p2p_bytes_per_s": rates}
    if a.spawned and world.Get_rank() == 0:
        args = ["--nbytes", str(a.nbytes), "--repeats", str(a.repeats), "--chunk-bytes"]
        args += [str(c) for c in a.chunk_bytes]
        result["spawned_p2p_bytes_per_s"] = spawned_rates(args, a.nbytes, a.chunk_bytes, a.repeats)
    # rank 1 waits with ftmpi's polling (sleeps between tests): a spinning Barrier would take a
    # core from the spawned pair
    wire.wait_all([world.Ibarrier()], 600.0, "limits: waiting for rank 0")
    if rates is not None:
        print("BENCH " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
