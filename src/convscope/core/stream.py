"""Features of named layers, for one batch or streamed over a dataset: the one forward-only feature loop.

Every method that reads a layer's output without gradients (top-k, dissection, inversion targets, UpconvNet codes,
the explorer, feature comparisons) goes through here, so three things are written once:

* batches over a dataset (:func:`image_batches`: a tensor, or an iterable of batches or ``(batch, ids)`` pairs);
* the forward pass ends as soon as the deepest requested layer has run (the probe's ``stop_early``), whatever
  the execution order;
* a requested layer that did not run is one error naming the fix (:func:`check_ran`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..errors import ConvscopeError
from .layers import resolve_layers
from .probe import probe
from .progress import progress_bar

__all__ = ["Images", "check_ran", "image_batches", "last_layer", "layer_features", "stream_layers"]

Images = torch.Tensor | Iterable[torch.Tensor] | Iterable[tuple[torch.Tensor, Sequence[int] | torch.Tensor]]
"""A dataset: a tensor ``N x C x H x W`` (ids are positions), or an iterable of batches / ``(batch, ids)`` pairs."""


def check_ran(names: Sequence[str], ran: Iterable[str]) -> None:
    """A ``ConvscopeError`` naming the first of ``names`` that is not among the layers that ``ran``."""
    seen = set(ran)
    missing = [n for n in names if n not in seen]
    if missing:
        raise ConvscopeError(f"layer(s) {', '.join(map(repr, missing))} did not run in the forward pass; pick a "
                             "layer from `convscope layers MODEL` that the model's forward() calls")


def image_batches(images: Images, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(batch N x C x H x W, image ids N)`` from a tensor, or from an iterable of batches / ``(batch, ids)``."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or not images.is_floating_point():
            raise ConvscopeError(f"expected a float tensor of images N x C x H x W, got {images.dtype} "
                                 f"{tuple(images.shape)}; use cs.load_images(paths, model)")
        for s in range(0, len(images), batch_size):
            chunk = images[s:s + batch_size]
            yield chunk, torch.arange(s, s + len(chunk))
        return
    offset = 0
    for item in images:
        ids = None
        if isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], torch.Tensor):
            item, ids = item
        if not isinstance(item, torch.Tensor) or item.dim() not in (3, 4) or not item.is_floating_point():
            raise ConvscopeError("each item of the image stream must be a float tensor N x C x H x W (or C x H x W), "
                                 f"or a (tensor, image ids) pair; got {type(item).__name__} "
                                 f"{tuple(getattr(item, 'shape', ()))}")
        item = item if item.dim() == 4 else item[None]
        if ids is None:
            ids_t = torch.arange(offset, offset + len(item))
        else:
            try:
                ids_t = torch.as_tensor(ids)
            except (TypeError, ValueError, RuntimeError):
                ids_t = torch.empty(0)
            if ids_t.is_floating_point() or ids_t.dim() != 1 or len(ids_t) != len(item):
                raise ConvscopeError(f"image ids must be {len(item)} integers for a batch of {len(item)} images, got "
                                     f"{ids!r}; use integer positions and keep your own list of names")
            ids_t = ids_t.long()
        offset += len(item)
        yield item, ids_t


def layer_features(model: nn.Module, x: torch.Tensor, layers: str | Sequence[str]) -> dict[str, torch.Tensor]:
    """Detached outputs of ``layers`` for the batch ``x``: one forward pass without gradients, ended right after
    the deepest of them; the model is left as it came."""
    names = list(resolve_layers(model, layers))
    with torch.no_grad(), probe(model, names, stop_early=True, detach=True) as p:
        p.forward(model, x)
        check_ran(names, p.called)
        acts = p.activations
    return {n: acts[n] for n in names}


def last_layer(model: nn.Module, layers: Sequence[str], x: torch.Tensor) -> str:
    """The layer among ``layers`` that runs last in the forward pass of ``x`` (one pass, ended once all have run),
    so a loop with gradients can stop right after it (``probe(..., stop_after=...)``)."""
    names = list(layers)
    if len(names) == 1:
        return names[0]
    with torch.no_grad(), probe(model, names, stop_early=True, check_first_pass=False, detach=True) as p:
        p.forward(model, x)
        check_ran(names, p.called)
        order = list(dict.fromkeys(p.called))
    return max(names, key=order.index)


def stream_layers(model: nn.Module, images: Images, layers: str | Sequence[str], batch_size: int = 32,
                  progress: bool | None = None, reduce: Callable[[str, torch.Tensor], object] | None = None,
                  desc: str = "features") -> Iterator[tuple[torch.Tensor, dict[str, object]]]:
    """For every batch: ``(image ids, {layer: detached output})``, one forward pass per batch without gradients,
    ended right after the deepest of ``layers``. With ``reduce``, ``{layer: reduce(layer, output)}`` instead,
    computed inside the forward hook so each full activation is freed as soon as the next layer has consumed it.
    A progress bar with an ETA runs over the batches. The model is restored when the stream ends or fails."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConvscopeError(f"batch_size={batch_size!r}: use a positive int")
    names = list(resolve_layers(model, layers))
    total = math.ceil(len(images) / batch_size) if isinstance(images, torch.Tensor) else None
    with contextlib.ExitStack() as stack:
        p = None
        for x, ids in progress_bar(image_batches(images, batch_size), total=total, desc=desc, unit="batch",
                                   progress=progress):
            if p is None:
                p = stack.enter_context(probe(model, names, detach=True, reduce=reduce, stop_early=True))
            with torch.no_grad():  # only around the pass: the caller's code between batches keeps its grad mode
                p.forward(model, x)
            check_ran(names, p.called)
            acts = p.activations
            p.clear()
            yield ids, {n: acts[n] for n in names}
