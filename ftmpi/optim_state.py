"""Optimizer description and state as data: what a server needs to run the worker's optimizer.

An optimizer is described by its class (``module:qualname``, which must be a
``torch.optim.Optimizer`` subclass) and each param group's hyper-parameters as JSON. Tensor
state (momentum buffers, Adam moments, step counts) travels as raw bytes plus a JSON table of
names, dtypes and shapes: never pickled, so loading state cannot execute code.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

_DTYPES = {
    str(dt).removeprefix("torch."): dt
    for dt in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


def dtype_name(dt: torch.dtype) -> str:
    name = str(dt).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"tensor dtype {dt} cannot be transferred; supported: {sorted(_DTYPES)}")
    return name


def dtype_of(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(
            f"unknown dtype {name!r} in state table; expected one of {sorted(_DTYPES)}"
        ) from None


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def snapshot_class_problem(path: object, job_class: str | None) -> str | None:
    """Why a snapshot's optimizer class ``path`` may not be loaded, or None. A snapshot is a
    file: loading it must not import code the job does not already use. With the job's own
    class known (``job_class``, from the workers) the snapshot must name that class; without
    it, the class must be ``torch.optim``'s or live in a module this process has imported."""
    if not isinstance(path, str) or ":" not in path:
        return f"its optimizer class {path!r} is not a module:qualname"
    module = path.partition(":")[0]
    if job_class is not None:
        if path != job_class:
            return f"it holds the state of optimizer {path}, this job runs {job_class}"
        return None
    if module == "torch.optim" or module.startswith("torch.optim.") or module in sys.modules:
        return None
    return (
        f"its optimizer class {path} is in module {module}, which this process has not "
        "imported; import it before ftmpi.init() (snapshots never import code themselves)"
    )


def import_optimizer_class(path: str) -> type[torch.optim.Optimizer]:
    """Import ``module:qualname`` and check it is an optimizer class."""
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer)):
        raise TypeError(f"{path} is not a torch.optim.Optimizer subclass")
    return obj


def group_hparams(group: Mapping[str, Any]) -> dict[str, Any]:
    """A param group's hyper-parameters as JSON-able values (tensors become floats)."""
    out: dict[str, Any] = {}
    for key, value in group.items():
        if key == "params":
            continue
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, tuple):
            value = list(value)
        if not _jsonable(value):
            raise TypeError(
                f"param-group option {key}={value!r} cannot be sent to a server; "
                "use numbers, strings, booleans, None or lists of them"
            )
        out[key] = value
    return out


def _jsonable(v: Any) -> bool:
    if v is None or isinstance(v, bool | int | float | str):
        return True
    if isinstance(v, list):
        return all(_jsonable(x) for x in v)
    return False


def _restore(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def build_optimizer(
    path: str, groups: Sequence[Mapping[str, Any]], params_by_group: Sequence[list[torch.Tensor]]
) -> torch.optim.Optimizer:
    """Construct the optimizer class at ``path`` over ``params_by_group`` with each group's
    hyper-parameters. Groups with no parameters on this shard keep an empty list, so group
    indices match the worker's optimizer."""
    cls = import_optimizer_class(path)
    param_groups = [
        {"params": list(ps), **{k: _restore(v) for k, v in g.items()}}
        for g, ps in zip(groups, params_by_group, strict=True)
    ]
    nonempty = [g for g in param_groups if g["params"]]
    build: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] = cls  # params only
    opt = build(nonempty)
    # Keep group indices aligned with the worker's optimizer.
    by_index: list[dict[str, Any] | None] = []
    it = iter(opt.param_groups)
    for g in param_groups:
        by_index.append(next(it) if g["params"] else None)
    opt._ftmpi_groups = by_index  # type: ignore[attr-defined]
    return opt


def apply_hparams(opt: torch.optim.Optimizer, groups: Sequence[Mapping[str, Any]]) -> None:
    """Set each group's hyper-parameters (e.g. a new learning rate) in place."""
    for target, g in zip(opt._ftmpi_groups, groups, strict=True):  # type: ignore[attr-defined]
        if target is None:
            continue
        for k, v in g.items():
            cur = target.get(k)
            if isinstance(cur, torch.Tensor):
                cur.fill_(v)
            else:
                target[k] = _restore(v)


def tensor_segments(
    entries: Iterable[tuple[str, torch.Tensor]],
) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Describe named tensors as a JSON table and return their bytes as views, without copying
    (a non-contiguous or non-CPU tensor is copied once). Each view shares memory with its
    tensor: the caller keeps the tensors unchanged while the views are in use. The table's
    offsets are those of the views laid end to end (see :func:`concat_segments`)."""
    table: list[dict[str, Any]] = []
    views: list[np.ndarray] = []
    offset = 0
    for name, t in entries:
        t = t.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
        table.append(
            {
                "name": name,
                "dtype": dtype_name(t.dtype),
                "shape": list(t.shape),
                "offset": offset,
                "nbytes": int(raw.nbytes),
            }
        )
        views.append(raw)
        offset += raw.nbytes
    return table, views


Payload = np.ndarray | Sequence[np.ndarray]
"""Bytes to send, receive or write: one contiguous array, or segments (each contiguous) in
order. Over MPI, sender and receiver split a payload into the same segments (see
:func:`ftmpi.wire.chunks`)."""


def segments_of(payload: Payload) -> list[np.ndarray]:
    return [payload] if isinstance(payload, np.ndarray) else list(payload)


def payload_nbytes(payload: Payload) -> int:
    return sum(int(s.nbytes) for s in segments_of(payload))


def concat_segments(payload: Payload) -> np.ndarray:
    """The payload's bytes laid end to end in one new buffer (each byte copied once)."""
    flat = [s.reshape(-1).view(np.uint8) for s in segments_of(payload)]
    buf = np.empty(sum(s.nbytes for s in flat), dtype=np.uint8)
    at = 0
    for s in flat:
        buf[at : at + s.nbytes] = s
        at += s.nbytes
    return buf


def table_segments(
    table: Sequence[Mapping[str, Any]], buf: np.ndarray, *, lead: int = 0
) -> list[np.ndarray]:
    """Split ``buf`` into the views a sender's segments land in: the first ``lead`` bytes, then
    one view per table entry (offsets counted from ``lead``). A receiver posts its chunks per
    segment, so that they match a sender that sends each segment's chunks separately."""
    raw = buf.reshape(-1).view(np.uint8)
    views = [raw[:lead]]
    for e in table:
        off = lead + int(e["offset"])
        views.append(raw[off : off + int(e["nbytes"])])
    return views


def pack_tensors(
    entries: Iterable[tuple[str, torch.Tensor]],
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Pack named tensors into a JSON table and one contiguous byte buffer (one copy)."""
    table, views = tensor_segments(entries)
    return table, concat_segments(views)


def unpack_tensors(
    table: Sequence[Mapping[str, Any]], buf: np.ndarray, *, copy: bool = True
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_tensors`; checks every entry's size against the buffer.

    ``copy=False`` returns tensors that share memory with a writable ``buf`` (which the caller
    must then not reuse), except where an entry is not aligned to its element size."""
    out: dict[str, torch.Tensor] = {}
    raw = buf.reshape(-1).view(np.uint8)
    share = not copy and raw.flags.writeable
    for e in table:
        dt = dtype_of(e["dtype"])
        shape = tuple(int(x) for x in e["shape"])
        size = dt.itemsize
        nbytes = math.prod(shape) * size
        off = int(e["offset"])
        if nbytes != int(e["nbytes"]) or off < 0 or off + nbytes > raw.size:
            raise ValueError(f"state entry {e['name']!r} does not fit the buffer (corrupt table)")
        part = raw[off : off + nbytes]
        if not nbytes:
            t = torch.empty(0, dtype=dt)
        elif share and part.ctypes.data % size == 0:
            t = torch.from_numpy(part).view(dt)
        else:
            t = torch.frombuffer(bytearray(part.tobytes()), dtype=dt)
        out[e["name"]] = t.reshape(shape)
    return out


def state_entries(
    opt: torch.optim.Optimizer, names: Mapping[torch.Tensor, str]
) -> tuple[list[tuple[str, torch.Tensor]], dict[str, Any]]:
    """Split an optimizer's per-parameter state into tensors (``param/key``) and JSON scalars."""
    tensors: list[tuple[str, torch.Tensor]] = []
    scalars: dict[str, Any] = {}
    for p, st in opt.state.items():
        name = names[p]
        for key in sorted(st):
            v = st[key]
            if isinstance(v, torch.Tensor):
                tensors.append((f"{name}/{key}", v))
            elif _jsonable(v):
                scalars[f"{name}/{key}"] = v
            else:
                raise TypeError(
                    f"optimizer state {name}/{key} of type {type(v).__name__} cannot be transferred"
                )
    return tensors, scalars


def load_state_entries(
    opt: torch.optim.Optimizer,
    params: Mapping[str, torch.Tensor],
    tensors: Mapping[str, torch.Tensor],
    scalars: Mapping[str, Any],
) -> None:
    """Install state produced by :func:`state_entries` into ``opt`` (keys for unknown parameters
    raise ``KeyError`` naming them)."""
    for full, value in [*tensors.items(), *scalars.items()]:
        name, _, key = full.rpartition("/")
        if name not in params:
            raise KeyError(f"optimizer state for unknown parameter {name!r}")
        p = params[name]
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            value = value.to(device=p.device)
        opt.state[p][key] = value
