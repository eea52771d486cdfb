"""What ftmpi asks of, and sets in, the Open MPI library itself (through ``ctypes``, for what
mpi4py does not expose): whether fault tolerance is on, and the skip of the runtime fence at
``MPI_Finalize``. Call these only after MPI is initialised (``mpi4py.MPI`` imported).
"""

from __future__ import annotations

import ctypes
import sys

FT_CVAR = b"mpi_ft_enable"
"""Open MPI's control variable for ULFM fault tolerance (``mpirun --with-ft ulfm`` sets it)."""
ASYNC_FINALIZE = "ompi_async_mpi_finalize"
"""Open MPI's internal flag that makes ``MPI_Finalize`` skip its runtime fence."""


def libmpi() -> list[ctypes.CDLL]:
    """The MPI libraries loaded in this process (those mapped from a ``libmpi.so``), or the
    process's global namespace where ``/proc/self/maps`` cannot be read."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "/libmpi.so" in line})
    except OSError:
        paths = []
    libs = []
    for path in paths:
        try:
            libs.append(ctypes.CDLL(path))
        except OSError:
            continue
    return libs or [ctypes.CDLL(None)]


def ft_enabled() -> bool:
    """Whether the MPI library runs with ULFM fault tolerance: the value of Open MPI's
    ``mpi_ft_enable`` control variable, read through the MPI tool information interface
    (``MPI_T_cvar_read``). ``False`` for an MPI that has no such variable or no ``MPI_T``
    (not Open MPI 5): it has no ULFM. Never raises."""
    for lib in libmpi():
        try:
            return _read_bool_cvar(lib, FT_CVAR)
        except (AttributeError, OSError):
            continue
    return False


def _read_bool_cvar(lib: ctypes.CDLL, name: bytes) -> bool:
    provided = ctypes.c_int()
    if lib.MPI_T_init_thread(0, ctypes.byref(provided)) != 0:  # MPI_THREAD_SINGLE
        return False
    try:
        index = ctypes.c_int()
        if lib.MPI_T_cvar_get_index(name, ctypes.byref(index)) != 0:
            return False  # MPI_T_ERR_INVALID_NAME: this MPI has no such variable
        handle = ctypes.c_void_p()
        count = ctypes.c_int()
        if lib.MPI_T_cvar_handle_alloc(index, None, ctypes.byref(handle), ctypes.byref(count)):
            return False
        try:
            value = (ctypes.c_char * 64)()  # an int or a C bool: any non-zero byte is true
            if lib.MPI_T_cvar_read(handle, value) != 0:
                return False
            return any(value.raw)
        finally:
            lib.MPI_T_cvar_handle_free(ctypes.byref(handle))
    finally:
        lib.MPI_T_finalize()


def skip_finalize_fence(role: str) -> bool:
    """Set Open MPI's ``ompi_async_mpi_finalize`` (no MCA parameter exists for it in Open MPI
    5), so ``MPI_Finalize`` skips its runtime fence over this process's original job; returns
    whether the flag is now set (read back).

    Without it, a process whose original job lost a rank waits in that fence at exit for the
    dead rank until ``mpirun`` ends the job (docs/recovery.md, "Exit after a failure", has the
    measurement). When the flag cannot be set (another MPI, or an Open MPI without that symbol)
    this says so on standard error, once, naming the consequence; it never raises."""
    for lib in libmpi():
        try:
            flag = ctypes.c_bool.in_dll(lib, ASYNC_FINALIZE)
        except (OSError, ValueError):
            continue
        flag.value = True
        if flag.value:
            return True
    print(
        f"ftmpi: {role}: could not set Open MPI's {ASYNC_FINALIZE} (no such symbol in this "
        "MPI library): MPI_Finalize will run its runtime fence over the original job, which "
        "waits for a rank of that job that died until mpirun ends the job (see "
        "docs/recovery.md, 'Exit after a failure')",
        file=sys.stderr,
        flush=True,
    )
    return False
