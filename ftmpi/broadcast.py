"""Worker-to-worker broadcasts with Horovod's signatures: parameters, optimizer state, objects.

All are collective over the workers (call them on every worker, as with Horovod) and finish
within the configured timeout or raise. Tensors travel as raw bytes; ``broadcast_object``
pickles, as ``hvd.broadcast_object`` does, so use it only for objects from the (trusted) root.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import numpy as np
import torch

from ftmpi.optim_state import pack_tensors, unpack_tensors
from ftmpi.runtime import runtime


def _backend() -> Any:
    backend = runtime().backend
    if backend is None:
        raise RuntimeError("broadcasts run on workers only")
    return backend


def _broadcast_tensor_(t: torch.Tensor, root_rank: int) -> None:
    if t.device.type == "cpu" and t.is_contiguous():
        _backend().broadcast_(t, root_rank)
        return
    staged = t.detach().to("cpu").contiguous()
    _backend().broadcast_(staged, root_rank)
    with torch.no_grad():
        t.copy_(staged)


def broadcast_bytes(data: bytes | None, root_rank: int) -> bytes:
    """``data`` from worker ``root_rank`` on every worker (length first, then the bytes)."""
    me = runtime().role_rank
    n = torch.tensor([len(data) if me == root_rank and data is not None else 0], dtype=torch.int64)
    _backend().broadcast_(n, root_rank)
    buf = torch.empty(int(n.item()), dtype=torch.uint8)
    if me == root_rank and data:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    if buf.numel():
        _backend().broadcast_(buf, root_rank)
    return buf.numpy().tobytes()


def broadcast_parameters(
    params: Mapping[str, torch.Tensor]
    | Iterable[tuple[str, torch.Tensor]]
    | Iterable[torch.Tensor],
    root_rank: int = 0,
) -> None:
    """Overwrite ``params`` in place on every worker with worker ``root_rank``'s values.

    Accepts ``model.state_dict()``, ``model.named_parameters()`` or a list of tensors, like
    ``hvd.broadcast_parameters``.
    """
    items = params.items() if isinstance(params, Mapping) else params
    for item in items:
        t = item[1] if isinstance(item, tuple) else item
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"broadcast_parameters: {type(t).__name__} is not a tensor")
        _broadcast_tensor_(t.data if isinstance(t, torch.nn.Parameter) else t, root_rank)


class StateDictOwner(Protocol):
    """What :func:`broadcast_optimizer_state` uses of an optimizer."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


def broadcast_optimizer_state(optimizer: StateDictOwner, root_rank: int = 0) -> None:
    """Give every worker's ``optimizer`` worker ``root_rank``'s state and hyper-parameters.

    With servers, the servers receive worker 0's state at the first ``step()`` (or the next one
    after ``load_state_dict``); this keeps the workers' local copies equal too. Tensor state
    travels as raw bytes with a JSON table, never pickled.
    """
    me = runtime().role_rank
    header = None
    payload = np.empty(0, np.uint8)
    if me == root_rank:
        sd = optimizer.state_dict()
        tensors, scalars = [], {}
        for idx, st in sd["state"].items():
            for key, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors.append((f"{idx}/{key}", v))
                else:
                    scalars[f"{idx}/{key}"] = v
        table, payload = pack_tensors(tensors)
        header = json.dumps(
            {"table": table, "scalars": scalars, "param_groups": sd["param_groups"]}
        ).encode()
    doc = json.loads(broadcast_bytes(header, root_rank))
    raw = np.frombuffer(
        broadcast_bytes(payload.tobytes() if me == root_rank else None, root_rank), dtype=np.uint8
    )
    if me == root_rank:
        return
    state: dict[int, dict[str, Any]] = {}
    entries = [*unpack_tensors(doc["table"], raw).items(), *doc["scalars"].items()]
    for full, v in entries:
        idx, _, key = full.partition("/")
        state.setdefault(int(idx), {})[key] = v
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        for g in doc["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None) -> Any:
    """``obj`` from worker ``root_rank`` on every worker (pickled, as in Horovod)."""
    me = runtime().role_rank
    data = pickle.dumps(obj) if me == root_rank else None
    out = broadcast_bytes(data, root_rank)
    return obj if me == root_rank else pickle.loads(out)
