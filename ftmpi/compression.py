"""Gradient compression for the workers' allreduce, with Horovod's interface.

``compress(t) -> (compressed, ctx)`` and ``decompress(compressed, ctx) -> t``. Horovod's own
``hvd.Compression.none``/``hvd.Compression.fp16`` are accepted wherever these are. A compressor
that changes the dtype needs the Horovod backend (MPI has no float16 sum).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Compressor(Protocol):
    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]: ...

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor: ...


class NoneCompressor:
    """No compression."""

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return tensor, None

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        return tensor


class FP16Compressor:
    """Floating-point gradients travel as float16 and are cast back after the allreduce."""

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if tensor.dtype.is_floating_point:
            return tensor.to(torch.float16), tensor.dtype
        return tensor, None

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        return tensor if ctx is None else tensor.to(ctx)


class Compression:
    """``ftmpi.Compression.none`` / ``ftmpi.Compression.fp16``, as ``hvd.Compression``."""

    none = NoneCompressor
    fp16 = FP16Compressor


def changes_dtype(compression: Compressor, dtype: torch.dtype) -> bool:
    """Whether ``compression`` turns a ``dtype`` tensor into another dtype."""
    out, _ = compression.compress(torch.zeros(1, dtype=dtype))
    return out.dtype != dtype
