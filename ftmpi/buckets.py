"""Gradient averaging that starts during backward: the flat gradient buffer in buckets.

A sync-mode step averages every worker's gradient in the flat buffer the servers are sent
(``ServerClient.grads``). With ``overlap`` (the default) that buffer is cut into buckets of
about ``bucket_bytes`` (whole parameters, contiguous in the buffer), and a hook on each
parameter (``register_post_accumulate_grad_hook``) copies its gradient into the buffer as soon
as backward has produced it; when a bucket's last gradient is in, its allreduce starts,
non-blocking, while backward goes on with the layers before it, as Horovod and PyTorch DDP do.
``step()`` (or ``synchronize()``) then starts what backward left (the gradients no hook
delivered: parameters that took no part in the loss) and waits for all of it.

**Order.** Non-blocking collectives on one communicator must start in the same order on every
worker. Buckets start in a fixed order (bucket 0 holds the model's last parameters, which
backward reaches first), and one starts only once every bucket before it has: a bucket that is
complete early waits for its turn. So whether a bucket starts inside backward, at the step, or
in a retry after a recovery (where every bucket starts at the step), every worker starts the
same collectives in the same order, and a replacement's first step matches the survivors'
retry of theirs.

**Failure.** A hook never raises: an exception inside backward would escape the step's
recovery. A failure to start or progress a collective is kept and raised by :meth:`reduce`,
which runs inside the step's retry loop (``PeerFailure``: the step recovers and retries; a
user error, e.g. a sparse gradient or more backward passes than ``backward_passes_per_step``,
is raised as such). A step that will recover before it communicates (a death the mirror saw, a
replacement to admit: ``WorkerRecovery.attempt_will_recover``, asked at the first gradient)
starts nothing in backward, so no worker completes a reduction its peers then retry; what those
checks find once buckets have started waits for the next step. After :meth:`reduce` raised,
nothing of the step's buckets is waited for (their requests are abandoned as every failed
wait's are) and the next :meth:`reduce` starts from the parameters' gradients, which hooks read
and never change.

**Semantics** (as Horovod's): a gradient is averaged as backward left it. A change made to
``p.grad`` between backward and ``step()`` is not averaged; change gradients between
``synchronize()`` and ``step()`` inside ``skip_synchronize()``, or turn ``overlap`` off.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from mpi4py import MPI

from ftmpi.collective import PendingReduce
from ftmpi.compression import Compressor
from ftmpi.fatal import UserError

StartReduce = Callable[[torch.Tensor, str], PendingReduce]
"""Start the average of a tensor across the workers (the backend's ``start_allreduce_`` with
the optimizer's op), under a name that is the same on every worker."""


def gather_grad(
    p: torch.Tensor, into: torch.Tensor, name: str, *, sparse_as_dense: bool, cuda: bool
) -> None:
    """Copy ``p``'s gradient into its slot ``into`` of a flat buffer (zeros if it has none);
    ``cuda``: a device-to-host copy into page-locked memory, not waited for. Raises
    ``ValueError`` for a sparse gradient without ``sparse_as_dense``."""
    if p.grad is None:
        into.zero_()
    elif p.grad.is_sparse:
        if not sparse_as_dense:
            raise ValueError(
                f"parameter {name!r} has a sparse gradient; pass sparse_as_dense=True to "
                "DistributedOptimizer (servers hold dense weights)"
            )
        into.copy_(p.grad.to_dense())
    else:
        into.copy_(p.grad, non_blocking=cuda)


@dataclass
class Bucket:
    """Whole parameters, contiguous in the flat gradient buffer, averaged as one tensor."""

    index: int
    view: torch.Tensor
    """Its part of the flat gradient buffer."""
    params: list[torch.Tensor]
    missing: int = 0
    """Gradients not yet copied in during this step (of parameters that require one; a
    frozen parameter's is copied in with the step's first)."""
    staged: Any = None
    """A CUDA event recorded after its last device-to-host copy (None on a CPU)."""
    wire: torch.Tensor | None = None
    """The tensor on the wire (``view`` itself, or its compressed form)."""
    ctx: Any = None
    pending: PendingReduce | None = field(default=None, repr=False)


def plan_buckets(sizes: Sequence[int], order: Sequence[int], nbytes: int) -> list[list[int]]:
    """Cut consecutive slots of the flat buffer (their ``sizes`` in bytes, in the buffer's
    order) into runs of at most ``nbytes`` each (a larger slot alone), returned as lists of
    slot indices in start order: the run holding the slot latest in backward's ``order`` (its
    parameter's position among the optimizer's; backward produces the last first) first."""
    runs: list[list[int]] = []
    size = 0
    for i, b in enumerate(sizes):
        if not runs or size + b > nbytes:
            runs.append([])
            size = 0
        runs[-1].append(i)
        size += b
    return sorted(runs, key=lambda run: -max(order[i] for i in run))


class GradientBuckets:
    """The flat gradient buffer's buckets, their hooks and their allreduces (see the module
    docstring). One per optimizer; ``start`` reads the backend at each call, so a backend
    rebuilt by a recovery is used from then on."""

    def __init__(
        self,
        flat: torch.Tensor,
        slots: Sequence[tuple[torch.Tensor, int, int]],
        names: dict[torch.Tensor, str],
        *,
        bucket_bytes: int,
        passes: int,
        start: StartReduce,
        first: Callable[[], bool],
        progress: Callable[[], None],
        compression: Compressor,
        sparse_as_dense: bool,
    ) -> None:
        """``flat``: the flat gradient buffer; ``slots``: (parameter, offset, element count)
        in the buffer, in the optimizer's parameter order; ``names``: each parameter's;
        ``first``: called at a step's first gradient, before anything starts (the fault
        injector's step: a worker killed "at step N" dies before its step communicates);
        True: the step will recover before it communicates, so nothing starts in backward;
        ``progress``: called at every gradient, to let other transfers in flight move on
        (the mirror's updates)."""
        self.start = start
        self.first = first
        self.progress = progress
        self.compression = compression
        self.names = names
        self.passes = passes
        self.sparse_as_dense = sparse_as_dense
        self.cuda = any(p.is_cuda for p, _, _ in slots)
        self.side = torch.cuda.Stream() if self.cuda else None  # type: ignore[no-untyped-call]
        """The stream device-to-host copies run on, off the compute stream."""
        self.slot_of = {id(p): flat[at : at + n].view(p.shape) for p, at, n in slots}
        by_offset = sorted(range(len(slots)), key=lambda k: slots[k][1])
        sizes = [slots[k][2] * flat.element_size() for k in by_offset]
        self.buckets: list[Bucket] = []
        self.bucket_of: dict[int, Bucket] = {}
        for index, run in enumerate(plan_buckets(sizes, by_offset, bucket_bytes)):
            members = [slots[by_offset[i]] for i in run]
            lo, hi = members[0][1], members[-1][1] + members[-1][2]
            b = Bucket(index, flat[lo:hi], [p for p, _, _ in members])
            self.buckets.append(b)
            for p in b.params:
                self.bucket_of[id(p)] = b
        self.counts: dict[int, int] = {}
        self.next = 0
        """Buckets started this step (the next to start)."""
        self.error: BaseException | None = None
        self.owner = threading.get_ident()
        self.threads_ok = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        self.params = [p for p, _, _ in slots]
        self.handles: dict[int, Any] = {}
        self._reset()

    @property
    def started(self) -> bool:
        """Whether a hook has delivered a gradient since the last :meth:`reduce`."""
        return bool(self.counts) or self.error is not None

    def _hook(self) -> None:
        """A hook on every parameter that requires a gradient and has none yet (one unfrozen
        since the last step gets one now; until then it is copied in at the step)."""
        for p in self.params:
            if p.requires_grad and id(p) not in self.handles:
                register = p.register_post_accumulate_grad_hook
                self.handles[id(p)] = register(self._on_grad)  # type: ignore[no-untyped-call]

    # ------------------------------------------------------------------ during backward

    def _on_grad(self, p: torch.Tensor) -> None:
        """A parameter's gradient is complete: copy it in, start what is ready. Never raises."""
        if self.error is not None:
            return
        try:
            if not self.counts:  # the step's first gradient: which parameters get one
                self.held = self.first()
                self.checked = not self.held
                for b in self.buckets:
                    hooked = [q.requires_grad and id(q) in self.handles for q in b.params]
                    b.missing = sum(hooked)
                    for q, h in zip(b.params, hooked, strict=True):
                        if not h:  # frozen, or no hook yet: copied in now, as at the step
                            self._copy_in(q)
            n = self.counts[id(p)] = self.counts.get(id(p), 0) + 1
            if n > self.passes:
                raise UserError(
                    f"parameter {self.names[p]!r} got a gradient {n} times before step(), and "
                    f"backward_passes_per_step is {self.passes}: raise it to the number of "
                    "backward passes per step (or run with overlap=False, which averages "
                    "whatever p.grad holds at step())"
                )
            if n < self.passes:
                return
            b = self.bucket_of[id(p)]
            self._copy_in(p)
            b.missing -= 1
            if b.missing == 0 and self.side is not None:
                b.staged = torch.cuda.Event()  # type: ignore[no-untyped-call]
                b.staged.record(self.side)
            if not self.held and (self.threads_ok or threading.get_ident() == self.owner):
                self._start_ready(wait=False)
                self._progress()
                self.progress()
        except Exception as exc:  # raised by reduce(), inside the step's recovery
            self.error = exc

    def _copy_in(self, p: torch.Tensor) -> None:
        g = self.slot_of[id(p)]
        name = self.names[p]
        if self.side is None:
            gather_grad(p, g, name, sparse_as_dense=self.sparse_as_dense, cuda=False)
            return
        self.side.wait_stream(torch.cuda.current_stream(p.device))
        with torch.cuda.stream(self.side):
            gather_grad(p, g, name, sparse_as_dense=self.sparse_as_dense, cuda=True)
        if p.grad is not None:
            p.grad.record_stream(self.side)

    def _start_ready(self, *, wait: bool) -> None:
        """Start buckets in order while the next one is complete (``wait``: wait for its
        device-to-host copies; otherwise stop at one still copying)."""
        while self.next < len(self.buckets):
            b = self.buckets[self.next]
            if b.missing:
                return
            if b.staged is not None:
                if not wait and not b.staged.query():
                    return
                b.staged.synchronize()
            b.wire, b.ctx = self.compression.compress(b.view)
            b.pending = self.start(b.wire, f".{b.index}")
            self.next += 1

    def _progress(self) -> None:
        """Let MPI move the started reductions along (Open MPI progresses a non-blocking
        collective only inside MPI calls)."""
        for b in self.buckets[: self.next]:
            if b.pending is not None and not b.pending.done():
                return

    # --------------------------------------------------------------------- at the step

    def reduce(self, *, gathered: bool = False) -> None:
        """Complete this step's average into the flat buffer: copy in the gradients no hook
        delivered (all of them with ``gathered`` False and no hook run; none with ``gathered``:
        the caller filled the buffer), start the remaining buckets in order and wait for every
        one. Raises what a hook kept, ``PeerFailure`` or ``CommTimeout`` (every bucket is
        abandoned, and the next call starts over)."""
        try:
            if self.error is not None:
                raise self.error
            if gathered:
                for b in self.buckets[self.next :]:
                    b.missing = 0
            else:
                self._gather_rest()
            self._start_ready(wait=True)
            for b in self.buckets:
                assert b.pending is not None
                b.pending.wait()
                if b.wire is not None and b.wire is not b.view:
                    b.view.copy_(self.compression.decompress(b.wire, b.ctx))
        except BaseException:
            self.abandon()
            raise
        finally:
            self._reset()

    def abandon(self) -> None:
        """The step's attempt failed (before or in :meth:`reduce`): stop waiting for every
        bucket started so far, and start the next attempt from the parameters' gradients. Call
        it before the recovery (a Horovod collective left unfinished restarts Horovod)."""
        for b in self.buckets:
            if b.pending is not None:
                b.pending.abandon()
        self._reset()

    def _gather_rest(self) -> None:
        """Copy in every gradient whose hook has not completed it this step."""
        for b in self.buckets[self.next :]:
            for p in b.params:
                if self.counts.get(id(p), 0) < self.passes:
                    self._copy_in(p)
            b.missing = 0
        if self.side is not None:
            self.side.synchronize()  # it waited for the compute stream before each copy

    def _reset(self) -> None:
        self._hook()
        self.held = False
        self.checked = False
        """This step's checks before it communicates ran at its first gradient (``first``) and
        let buckets start: it must not recover before its reduction now (the other workers may
        have completed theirs), so what they found waits for the next step."""
        self.counts = {}
        self.next = 0
        self.error = None
        for b in self.buckets:
            b.missing, b.staged, b.wire, b.ctx, b.pending = len(b.params), None, None, None, None
