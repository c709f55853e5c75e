"""Device selection and the CPU allocator policy."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
from collections.abc import Callable

import torch

from ..errors import ConvscopeError

DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
_USE = "use auto, cpu, cuda, cuda:N or mps (--device)"


def resolve_device(device: str | torch.device | int | None = "auto") -> torch.device:
    """``"auto"``/None -> CUDA when available, else CPU. Anything else must name a device this machine has
    (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``xpu``; an int is a CUDA index); otherwise a one-line error."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise ConvscopeError(f"device {device!r} is a {type(device).__name__}, not a device name; {_USE}")
    if isinstance(device, int):
        device = f"cuda:{device}"
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, ValueError, TypeError):
        raise ConvscopeError(f"unknown device {str(device)!r}; {_USE}") from None
    if dev.type not in DEVICE_TYPES:
        raise ConvscopeError(f"device {str(dev)!r} is not supported (convscope runs on {', '.join(DEVICE_TYPES)}); "
                             f"{_USE}")
    if dev.type == "cpu":
        return torch.device("cpu")
    backend = getattr(torch, dev.type, None)
    available = bool(backend is not None and backend.is_available())
    if not available:
        raise ConvscopeError(f"device {str(dev)!r} was asked for but this PyTorch sees no {dev.type.upper()} device; "
                             "use cpu or auto (--device cpu)")
    count = int(backend.device_count()) if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        valid = ", ".join(f"{dev.type}:{i}" for i in range(count))
        raise ConvscopeError(f"device {str(dev)!r} does not exist: this machine has {count} {dev.type.upper()} "
                             f"device{'s' if count != 1 else ''} ({valid}); use one of those or auto")
    return dev


# glibc's default malloc returns big activation buffers to the OS after every op, so batched CPU passes
# spend more time in page faults than in arithmetic. Raising the mmap and trim thresholds keeps them in the
# heap (measured: batch 8-32 about 2x cheaper per image). See benchmarks/README.md.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_cpu_allocator(mmap_threshold: int = 2**31 - 1, trim_threshold: int = 2**34) -> bool:
    """Apply the allocator policy with ``mallopt`` (glibc only). Returns True when it was applied.

    Skipped when ``CONVSCOPE_MALLOC=default`` or when the environment already sets ``GLIBC_TUNABLES``.
    """
    if os.environ.get("CONVSCOPE_MALLOC", "tuned") == "default" or "GLIBC_TUNABLES" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok1 = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(min(mmap_threshold, 2**31 - 1)))
        ok2 = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(min(trim_threshold, 2**31 - 1)))
    except (OSError, AttributeError):
        return False
    return bool(ok1 and ok2)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None elsewhere: musl, macOS, Windows)."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def release_memory(collect: bool = True) -> bool:
    """Hand freed heap memory back to the OS: ``gc.collect()`` (``collect``) then glibc's ``malloc_trim(0)``
    (big freed buffers otherwise stay in malloc's arenas, and in the process's RSS). True when trimmed."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    return bool(trim is not None and trim(0) >= 0)
