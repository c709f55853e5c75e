"""Batch sizes chosen from the model's measured activation sizes and the allocator in force (issue 23).

Every batched method (occlusion copies, SmoothGrad / Integrated Gradients samples, activation-maximization and
inversion rows, top-k / dissection / atlas data batches, deletion / insertion passes) takes ``batch_size="auto"``
by default and resolves it here with :func:`resolve_batch_size`; an explicit int is used as given.

The policy (:func:`auto_batch_size`):

* Measure the model's layer outputs for ONE image once (:func:`activation_sizes`: one forward pass with a probe on
  every module, cached per model, input shape, dtype and device).
* Under glibc's default malloc a buffer above its mmap threshold (dynamic, at most 32 MiB on 64-bit) is mapped
  afresh and page-faulted in by every operation. So the batch keeps the largest activation below that threshold:
  ``floor(threshold / (largest per image x multiplier))`` rows, where ``multiplier`` is what one row allocates per
  activation (K for K batched gradients).
* With a tuned allocator (:func:`~convscope.core.device.tune_cpu_allocator`, ``GLIBC_TUNABLES``, jemalloc /
  tcmalloc preloaded) or on CUDA, big buffers are reused, so only the memory budget bounds the batch: a quarter of
  the available RAM (CUDA: free device memory) divided by what a row keeps alive (every layer's output for a
  backward pass, a few of the largest for a forward pass).
* Always at least 1, at most the method's useful maximum (``limit``: the number of copies, units, images) and at
  most :data:`CPU_MAX_ROWS` / :data:`CUDA_MAX_ROWS` rows (bigger batches buy nothing there and only hold memory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import weakref
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import ConvscopeError
from .device import AllocatorState, allocator_state, first_use
from .layers import named_layers
from .probe import probe

__all__ = ["AUTO", "BUDGET_FRACTION", "CPU_MAX_ROWS", "CUDA_MAX_ROWS", "ActivationSizes", "BatchSize",
           "activation_sizes", "auto_batch_size", "available_memory", "check_batch_size", "resolve_batch_size"]

AUTO = "auto"
BatchSize = int | Literal["auto"]
"""``batch_size=`` of a batched method: a positive int, or ``"auto"`` (:func:`auto_batch_size`)."""
CPU_MAX_ROWS = 64
CUDA_MAX_ROWS = 512
BUDGET_FRACTION = 0.25
FALLBACK_ROWS = 8  # a model whose activations cannot be measured on a plain image batch


@dataclass(frozen=True)
class ActivationSizes:
    """Layer outputs of ONE image, in bytes: the ``largest`` (and its ``layer``) and the ``total`` over every
    module's output (what a backward pass keeps alive, counted generously: containers repeat their last child)."""

    largest: int
    layer: str
    total: int


_SIZES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, ActivationSizes | None]] = weakref.WeakKeyDictionary()


def _nbytes(out: object) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return max((_nbytes(o) for o in out), default=0)
    if isinstance(out, dict):
        return max((_nbytes(o) for o in out.values()), default=0)
    return 0


def activation_sizes(model: nn.Module, sample: torch.Tensor) -> ActivationSizes | None:
    """Per-image sizes of the model's layer outputs, from one forward pass of ``sample[:1]`` (zeros of its shape,
    dtype and device) with a probe on every module; cached per (model, image shape, dtype, device) while the model
    lives. None when the model has no submodules or cannot run such a sample (the caller falls back)."""
    key = (tuple(sample.shape[1:]), sample.dtype, sample.device)
    per_model = _SIZES.setdefault(model, {})
    if key in per_model:
        return per_model[key]
    layers = list(named_layers(model))
    found: ActivationSizes | None = None
    if layers:
        one = torch.zeros((1, *sample.shape[1:]), dtype=sample.dtype, device=sample.device)
        sizes: dict[str, int] = {}
        try:
            with torch.no_grad(), probe(model, layers, keep_all_calls=True, detach=True, layout=None,
                                        reduce=lambda _name, t: _nbytes(t)) as p:
                with contextlib.suppress(Exception):  # a model that cannot run to the end: the layers that ran
                    model(one)
                sizes = {n: max((v if isinstance(v, int) else _nbytes(v) for v in p.outputs(n)), default=0)
                         for n in layers}
        except (RuntimeError, ValueError, TypeError, ConvscopeError):
            sizes = {}
        if sizes and max(sizes.values()) > 0:
            layer = max(sizes, key=sizes.__getitem__)
            found = ActivationSizes(sizes[layer], layer, sum(sizes.values()))
    per_model[key] = found
    return found


def available_memory(device: torch.device) -> int:
    """Bytes free for new buffers: CUDA free memory, else the OS's available RAM (``MemAvailable``)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def auto_batch_size(model: nn.Module, sample: torch.Tensor, *, multiplier: int = 1, grad: bool = False,
                    limit: int | None = None, allocator: AllocatorState | None = None,
                    memory: int | None = None, row_bytes: int | None = None) -> int:
    """Rows per pass for ``model`` on images shaped like ``sample`` (see the module docstring).

    Args:
        multiplier: buffers one row allocates per layer output (K batched gradients: K).
        grad: the pass is forward + backward (every layer's output stays alive until the backward).
        limit: the method's useful maximum (copies, units, images).
        allocator, memory: the allocator state and the free bytes to assume (default: this process's, measured).
        row_bytes: the largest buffer one row allocates, when the method knows it better than the model's
            largest layer output (incremental occlusion computes only each copy's dirty boxes).
    """
    device = sample.device
    sizes = activation_sizes(model, sample)
    if sizes is not None and row_bytes is not None:
        sizes = dataclasses.replace(sizes, largest=max(1, int(row_bytes)))
    ceiling = CUDA_MAX_ROWS if device.type == "cuda" else CPU_MAX_ROWS
    rows = min(ceiling, limit) if limit is not None else ceiling
    if sizes is None:
        return max(1, min(rows, FALLBACK_ROWS))
    mult = max(1, int(multiplier))
    if device.type != "cuda":
        state = allocator if allocator is not None else allocator_state()
        if state.mmap_threshold is not None:
            rows = min(rows, state.mmap_threshold // (sizes.largest * mult))
    free = available_memory(device) if memory is None else memory
    per_row = (sizes.total + 2 * mult * sizes.largest) if grad else 3 * mult * sizes.largest
    rows = min(rows, int(BUDGET_FRACTION * free) // max(1, per_row))
    return max(1, rows)


def check_batch_size(batch_size: object, what: str) -> None:
    """A one-line error naming ``what`` unless ``batch_size`` is a positive int or ``"auto"``."""
    if isinstance(batch_size, str) and batch_size == AUTO:
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConvscopeError(f"{what}(batch_size={batch_size!r}): use a positive int or 'auto'")


def resolve_batch_size(batch_size: BatchSize, model: nn.Module, sample: torch.Tensor, what: str, *,
                       multiplier: int = 1, grad: bool = False, limit: int | None = None,
                       row_bytes: int | None = None) -> int:
    """``batch_size`` as rows per pass: a positive int as given, ``"auto"`` through :func:`auto_batch_size` (on the
    CPU, the allocator's first-use policy applies first: :func:`~convscope.core.device.first_use`); anything else
    a one-line error naming ``what``."""
    if isinstance(batch_size, str) and batch_size == AUTO:
        if sample.device.type == "cpu":
            first_use()
        return auto_batch_size(model, sample, multiplier=multiplier, grad=grad, limit=limit, row_bytes=row_bytes)
    check_batch_size(batch_size, what)
    return int(batch_size)
