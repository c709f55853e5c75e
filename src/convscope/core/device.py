"""Device selection and the CPU allocator policy."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

from ..errors import ConvscopeError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None -> CUDA when available, else CPU; ``"cuda"`` without a GPU is a clear error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConvscopeError("--device cuda was asked for but this PyTorch sees no CUDA GPU; use --device cpu "
                             "or --device auto")
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
