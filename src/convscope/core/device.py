"""Device selection and the CPU allocator policy."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import platform
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

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
    if backend is None or not backend.is_available():
        raise ConvscopeError(f"device {str(dev)!r} was asked for but this PyTorch sees no {dev.type.upper()} device; "
                             "use cpu or auto (--device cpu)")
    count = int(backend.device_count()) if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        valid = ", ".join(f"{dev.type}:{i}" for i in range(count))
        raise ConvscopeError(f"device {str(dev)!r} does not exist: this machine has {count} {dev.type.upper()} "
                             f"device{'s' if count != 1 else ''} ({valid}); use one of those or auto")
    return dev


# glibc's default malloc maps every buffer above its mmap threshold afresh and unmaps it on free, and trims the
# heap top above twice that threshold, so batched CPU passes spend more time in page faults than in arithmetic.
# The threshold is dynamic: it starts at 128 KiB and rises to the size of a freed mapped buffer, up to
# DEFAULT_MMAP_THRESHOLD_MAX (32 MiB on 64-bit); above that every buffer is always a fresh mapping. Raising the
# mmap and trim thresholds keeps big buffers in the heap. See benchmarks/README.md.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
DEFAULT_MMAP_THRESHOLD_MAX = 32 * 2**20
"""glibc's bound on its dynamic mmap threshold on 64-bit: a buffer above it is mapped on every allocation."""
GLIBC_INITIAL_MMAP_THRESHOLD = 128 * 2**10
"""glibc's starting (and, once ``trim_threshold`` alone is set, fixed) mmap threshold."""
TUNED_MMAP_THRESHOLD = 2**31 - 1
PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_tuned_here: dict[str, int] = {}  # what tune_cpu_allocator() applied in this process ({"mmap_threshold": bytes})


def tune_cpu_allocator(mmap_threshold: int = TUNED_MMAP_THRESHOLD, trim_threshold: int = 2**34) -> bool:
    """Apply the allocator policy with ``mallopt`` (glibc only). Returns True when it was applied.

    Skipped when ``CONVSCOPE_MALLOC=default``, when the environment already tunes the allocator
    (``GLIBC_TUNABLES``, jemalloc / tcmalloc / mimalloc in ``LD_PRELOAD``), or off glibc. Process-wide: freed heap
    memory then stays with the process (``release_memory()`` hands it back). :func:`allocator_state` remembers it.
    """
    if _tuned_here:
        return True
    if os.environ.get("CONVSCOPE_MALLOC", "tuned") == "default" or "GLIBC_TUNABLES" in os.environ \
            or _preloaded(os.environ) is not None:
        return False
    name = ctypes.util.find_library("c")
    if not name or not _is_glibc():
        return False
    try:
        libc = ctypes.CDLL(name)
        mmap = min(mmap_threshold, 2**31 - 1)
        ok1 = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap))
        ok2 = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(min(trim_threshold, 2**31 - 1)))
    except (OSError, AttributeError):
        return False
    if ok1 and ok2:
        _tuned_here["mmap_threshold"] = mmap
    return bool(ok1 and ok2)


@dataclass(frozen=True)
class AllocatorState:
    """Which CPU allocator serves this process, as far as batch sizes are concerned.

    Attributes:
        name: ``"glibc default"``, ``"convscope"`` (:func:`tune_cpu_allocator` ran here), ``"GLIBC_TUNABLES"``,
            ``"jemalloc"`` / ``"tcmalloc"`` / ``"mimalloc"`` (preloaded or linked), or ``"other"`` (not glibc).
        mmap_threshold: bytes above which one buffer is mapped afresh (and page-faulted in) by every operation;
            None where no such bound is known. glibc defaults: 32 MiB (:data:`DEFAULT_MMAP_THRESHOLD_MAX`).
        tuned: big buffers stay in the heap (a tuned glibc, or another allocator): batch by the memory budget.
    """

    name: str
    mmap_threshold: int | None
    tuned: bool


def allocator_state(environ: Mapping[str, str] | None = None, tuned_here: bool | None = None) -> AllocatorState:
    """The allocator in force: this process's :func:`tune_cpu_allocator`, then ``LD_PRELOAD`` (or a linked
    jemalloc / tcmalloc / mimalloc), then ``GLIBC_TUNABLES`` (``glibc.malloc.mmap_threshold``; a
    ``trim_threshold`` alone freezes glibc's threshold at 128 KiB), else glibc's defaults. ``environ`` /
    ``tuned_here`` replace ``os.environ`` / this process's record (to ask about another setting)."""
    env = os.environ if environ is None else environ
    here = bool(_tuned_here) if tuned_here is None else tuned_here
    if here:
        return AllocatorState("convscope", _tuned_here.get("mmap_threshold", TUNED_MMAP_THRESHOLD), True)
    other = _preloaded(env) or (_linked_allocator() if environ is None else None)
    if other is not None:
        return AllocatorState(other, None, True)
    if not _is_glibc():
        return AllocatorState("other", None, True)
    tunables = dict(item.partition("=")[::2] for item in env.get("GLIBC_TUNABLES", "").split(":") if "=" in item)
    mmap, trim = tunables.get("glibc.malloc.mmap_threshold"), tunables.get("glibc.malloc.trim_threshold")
    if mmap is not None:
        value = _int(mmap)
        if value is not None:
            return AllocatorState("GLIBC_TUNABLES", value, value > DEFAULT_MMAP_THRESHOLD_MAX)
    if trim is not None:
        return AllocatorState("GLIBC_TUNABLES", GLIBC_INITIAL_MMAP_THRESHOLD, False)
    return AllocatorState("glibc default", DEFAULT_MMAP_THRESHOLD_MAX, False)


def _int(text: str) -> int | None:
    try:
        return int(text, 0)
    except ValueError:
        return None


def _preloaded(env: Mapping[str, str]) -> str | None:
    pre = env.get("LD_PRELOAD", "").lower()
    return next((a for a in PRELOADED_ALLOCATORS if a in pre), None)


@functools.cache
def _linked_allocator() -> str | None:
    """A jemalloc / tcmalloc / mimalloc mapped into this process (linked, or preloaded before start)."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read().lower()
    except OSError:
        return None
    return next((a for a in PRELOADED_ALLOCATORS if f"lib{a}" in maps), None)


@functools.cache
def _is_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


FIRST_USE = "hint"
"""What the library does the first time a batched CPU method resolves ``batch_size="auto"`` under glibc's
defaults: ``"hint"`` (one line on stderr saying how to tune; batch sizes stay under the mmap threshold) or
``"tune"`` (:func:`tune_cpu_allocator`). Measured (benchmarks/batch_bench.py, lite0, CPU time per unit): with
"auto" batches glibc's defaults cost 1.07-1.40x the tuned allocator, not the 2-2.6x of fixed batches of 32-64,
so the library leaves the process-wide setting to the user (the CLI, which owns its process, tunes)."""
ALLOCATOR_HINT = ("convscope: glibc's default malloc maps large activation buffers afresh on every operation, so "
                  "batches are kept small; cs.tune_cpu_allocator() (what the CLI does) or a preloaded jemalloc / "
                  "tcmalloc makes batched CPU methods {gain} faster (CONVSCOPE_MALLOC=default silences this)")
ALLOCATOR_GAIN = "1.1-1.4x"
_first_use_done: list[bool] = []


def first_use() -> AllocatorState:
    """Apply :data:`FIRST_USE` once per process, unless the user chose the allocator (``CONVSCOPE_MALLOC=default``,
    ``GLIBC_TUNABLES``, a preloaded allocator, :func:`tune_cpu_allocator` already called) or it is not glibc.
    Returns the allocator state afterwards."""
    state = allocator_state()
    if _first_use_done or state.tuned or state.name != "glibc default" \
            or os.environ.get("CONVSCOPE_MALLOC") == "default":
        return state
    _first_use_done.append(True)
    if FIRST_USE == "tune" and tune_cpu_allocator():
        return allocator_state()
    print(ALLOCATOR_HINT.format(gain=ALLOCATOR_GAIN), file=sys.stderr)
    return state


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
