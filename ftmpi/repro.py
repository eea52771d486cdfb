"""Reproducibility: the per-step RNG policy and deterministic mode.

**RNG policy.** Every random draw of a training step is a function of ``(seed, step, worker)``:
data order comes from :mod:`ftmpi.sampler` (a pure function of seed, epoch, step and worker),
and :func:`seed_step` reseeds torch (every device), numpy's global generator and Python's
``random`` from :func:`ftmpi.sampler.step_seed` before the step. A rolled-back, resumed or
replayed run therefore draws the same batches and the same dropout masks at every step.
:class:`ftmpi.TrainingState` makes this automatic for a :class:`~ftmpi.sampler.ShardedBatches`
loop (each batch reseeds before it is returned); any other loop calls ``ftmpi.seed_step(step)``
at the start of each step. The policy is recorded, as :func:`rng_policy`, in the manifest and in
every server snapshot.

**Deterministic mode** (``FTMPI_DETERMINISTIC=1``, ``ftmpi-run --deterministic``): every rank
calls ``torch.use_deterministic_algorithms(True)`` (an operation without a deterministic
implementation then raises instead of silently varying), switches off cuDNN autotuning and sets
``CUBLAS_WORKSPACE_CONFIG`` if unset. Reduction order is fixed by the MPI backend for two workers
(one addition); :func:`caveats` names what can still break bit-exactness in a given run, and
worker 0 warns about each one (``RuntimeWarning``) when deterministic mode is on.
"""

from __future__ import annotations

import os
import random
import warnings
from typing import Any

import numpy as np
import torch

from ftmpi.config import Config
from ftmpi.runtime import current
from ftmpi.sampler import step_seed

__all__ = ["apply_deterministic", "caveats", "determinism_record", "rng_policy", "seed_step"]

RNG_POLICY_VERSION = 1
GENERATORS = ("torch", "numpy", "random")


def _defaults() -> tuple[int, int]:
    """``(seed, worker)`` of the running job: the config's seed and ``ftmpi.rank()``, or
    ``(0, 0)`` before :func:`ftmpi.init`."""
    rt = current()
    if rt is None or rt.is_server:
        return 0, 0
    return rt.config.seed, rt.role_rank


def seed_step(step: int, *, seed: int | None = None, worker: int | None = None) -> int:
    """Reseed torch (all devices), numpy's global RNG and Python's ``random`` for ``step``.

    The seed is ``step_seed(seed, step, worker)``; ``seed`` defaults to the run's
    ``FTMPI_SEED`` and ``worker`` to ``ftmpi.rank()`` (both 0 before ``ftmpi.init()``). Returns
    the 63-bit seed used. Raises ``ValueError`` for a negative step, seed or worker (numpy's
    ``SeedSequence`` takes non-negative integers only).
    """
    default_seed, default_worker = _defaults()
    seed = default_seed if seed is None else seed
    worker = default_worker if worker is None else worker
    for name, value in (("step", step), ("seed", seed), ("worker", worker)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"seed_step: {name}={value!r} must be an integer >= 0")
    s = step_seed(int(seed), int(step), int(worker))
    torch.manual_seed(s)
    np.random.seed(s & 0xFFFFFFFF)
    random.seed(s)
    return s


def rng_policy(seed: int) -> dict[str, Any]:
    """The RNG policy as recorded in manifests and snapshots (JSON-able)."""
    return {
        "version": RNG_POLICY_VERSION,
        "seed": seed,
        "per_step_seed": "ftmpi.sampler.step_seed(seed, step, worker)",
        "generators": list(GENERATORS),
        "data_order": "ftmpi.sampler: PCG64([seed, epoch]) permutation, sliced by step and worker",
    }


def apply_deterministic(config: Config) -> bool:
    """Switch on torch's deterministic algorithms if ``config.deterministic``; return whether
    they are on. Called by ``ftmpi.init()`` on every rank, before any model work."""
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return torch.are_deterministic_algorithms_enabled()


def caveats(config: Config, *, backend: str, workers: int) -> list[str]:
    """What can make two runs of this configuration differ bit for bit (a pure function).

    ``backend`` is the collective backend that runs (``mpi``, ``horovod`` or ``none``).
    """
    out: list[str] = []
    if not config.deterministic:
        out.append(
            "deterministic=0: torch may pick non-deterministic kernels (CPU kernels are "
            "deterministic in practice, CUDA ones often are not); use --deterministic"
        )
    if config.mode == "async":
        out.append("mode=async: servers apply gradients in arrival order, which depends on timing")
    if backend == "horovod":
        out.append(
            "backend=horovod: the allreduce's summation order (ring/tree algorithm, tensor "
            "fusion, NCCL on GPUs) is Horovod's, not guaranteed fixed across runs or versions "
            "for more than 2 workers; use FTMPI_BACKEND=mpi"
            if workers > 2
            else "backend=horovod: after a failure the run continues on the MPI backend"
        )
    elif backend == "mpi" and workers > 2:
        out.append(
            f"{workers} workers: MPI_Allreduce's summation order is chosen by the MPI library "
            "(fixed for one library version, message size and rank count in practice, not "
            "guaranteed by MPI)"
        )
    kills = [k for k in config.kill.split(",") if k]
    timed = [k for k in kills if not k.split("@", 1)[-1].startswith("step=")]
    if timed:
        out.append(
            f"time-scheduled kill(s) {','.join(timed)}: the step a rank dies at depends on "
            "timing; use step=N"
        )
    if kills and any(k.startswith("worker") for k in kills) and not config.respawn_workers:
        out.append(
            "a worker kill without respawn_workers changes the worker count and the data split"
        )
    if config.strategy in ("stateless", "chain+stateless") and kills:
        out.append(
            f"strategy={config.strategy}: how many gradients are logged while a server is down "
            "depends on timing (down_for)"
        )
    if config.chained and (config.chain_ack != "tail" or config.replicate_every != 1):
        out.append(
            f"chain_ack={config.chain_ack}, replicate_every={config.replicate_every}: a head "
            "death can lose updates; chain_ack=tail, replicate_every=1 loses none"
        )
    return out


def determinism_record(config: Config, *, backend: str, workers: int) -> dict[str, Any]:
    """The manifest's ``determinism`` section."""
    return {
        "deterministic": bool(config.deterministic),
        "torch_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "caveats": caveats(config, backend=backend, workers=workers),
    }


def warn_caveats(config: Config, *, backend: str, workers: int) -> list[str]:
    """In deterministic mode, warn (``RuntimeWarning``) about each caveat; return them."""
    found = caveats(config, backend=backend, workers=workers) if config.deterministic else []
    for text in found:
        warnings.warn(f"ftmpi deterministic mode: {text}", RuntimeWarning, stacklevel=2)
    return found
