"""The strongest activations of every unit over a dataset, their receptive fields, and dead units.

Zeiler & Fergus 2014 (Sec. 4, Fig. 2) show, for each unit, the 9 strongest activations over the dataset: the image
patches under each activation's receptive field beside the DeconvNet projection of that activation.

:func:`top_k_activations` streams over the dataset: one forward pass per batch captures all chosen layers at once
(stopping after the deepest); for every unit the strongest position of its feature map in each image (value and
``(y, x)``) is a candidate, and a running merge (``torch.topk`` over the kept k and the batch's candidates) keeps
the k best. Memory is ``k x units`` per layer, whatever the dataset size. The same pass gives the dataset maximum
of every unit, hence the dead units (never above a tolerance): :meth:`TopKActivations.dead_units`,
:func:`dead_units`.

:func:`receptive_field` maps a unit location to its input-pixel box: from the chain of convolution / pooling
kernels, strides, paddings and dilations for sequential networks (``[a, b] -> [a s - p, b s - p + d (k - 1)]`` per
layer, going down), or from the gradient's support for any network.
"""

from __future__ import annotations

import io
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from PIL import Image
from torch import nn

from ..core.batching import BatchSize, check_batch_size, resolve_batch_size
from ..core.layers import resolve_layers
from ..core.model import input_denormalizer
from ..core.probe import probe
from ..core.render import DisplayMode, grid, to_display
from ..core.stream import Images, layer_features, stream_layers
from ..errors import ConvscopeError, DataError
from .deconvnet import Chain, build_chain, deconvnet_rows, spatial_max


@dataclass(frozen=True)
class DeadUnits:
    """Units of ``layer`` whose activation never exceeded ``tol`` over the dataset.

    ``units``: their indices; ``max_activation``: every unit's dataset maximum (``C``); ``fraction``: dead / all.
    """

    layer: str
    units: torch.Tensor
    max_activation: torch.Tensor
    tol: float

    @property
    def fraction(self) -> float:
        return len(self.units) / max(1, len(self.max_activation))


@dataclass(frozen=True)
class TopKActivations:
    """The k strongest activations of every unit of ``layer`` over a dataset, strongest first.

    Attributes:
        values: ``units x k``, each unit's spatial maximum in the image (its activation at ``locations``).
        image_ids: ``units x k``, the image each value comes from (its position in the stream, or the ids given).
        locations: ``units x k x 2``, ``(y, x)`` of the maximum in the layer's feature map (``(0, 0)`` for a linear
            layer).
        shape: the layer's output shape without the batch dimension.
        images_seen: how many images were scanned (``k`` is at most this).
    """

    layer: str
    values: torch.Tensor
    image_ids: torch.Tensor
    locations: torch.Tensor
    shape: tuple[int, ...]
    images_seen: int

    def dead_units(self, tol: float = 0.0) -> DeadUnits:
        """The units whose dataset maximum (``values[:, 0]``) is ``<= tol``."""
        top = self.values[:, 0]
        return DeadUnits(self.layer, torch.nonzero(top <= tol).flatten(), top, float(tol))


def select_top(values: torch.Tensor, ids: torch.Tensor, locs: torch.Tensor, k: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, the ``k`` best candidates: ``values`` / ``ids`` ``U x M``, ``locs`` ``U x M x 2``. Ordered by value
    (descending), ties by image id (ascending): a total order, so merging parts of a dataset in any grouping (batch
    by batch, or shards from several workers) keeps the same candidates."""
    order = ids.argsort(dim=1, stable=True)  # ids ascending, then a stable sort by value: ties keep that order
    values, ids, locs = values.gather(1, order), ids.gather(1, order), locs.gather(1, order[..., None].expand_as(locs))
    order = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, order), ids.gather(1, order), locs.gather(1, order[..., None].expand(-1, -1, 2))


def _yx(flat: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Flat spatial indices of ``act``'s maps as ``(y, x)`` pairs (``... x 2``; 0 for a linear layer)."""
    width = act.shape[-1] if act.dim() == 4 else 1
    return torch.stack([flat // width, flat % width], dim=-1)


class RunningTopK:
    """Keeps, per unit, the k largest candidates seen so far (values, image ids, locations ``U x k (x 2)``).

    The one top-k state of convscope: :func:`top_k_activations` streams into it, dissection saves and resumes it
    (:meth:`state_dict` / :meth:`from_state`), the atlas merges the states of dataset shards (:meth:`best`,
    :meth:`to_bytes`). Candidates are ordered by value (descending), ties by image id (ascending), so merging parts
    in any grouping gives the same result."""

    def __init__(self, layer: str, k: int) -> None:
        self.layer, self.k = layer, k
        self.values: torch.Tensor | None = None
        self.ids = self.locs = torch.empty(0)
        self.shape: tuple[int, ...] = ()
        self.seen = 0

    @staticmethod
    def candidates(layer: str, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """One image's candidate per unit: its spatial maximum (``N x C``), the ``(y, x)`` of it (``N x C x 2``)
        and the layer's output shape. Cheap to keep: this is what the forward hook records."""
        if not isinstance(act, torch.Tensor) or act.dim() not in (2, 4):
            raise ConvscopeError(f"layer {layer!r} outputs {tuple(getattr(act, 'shape', ()))}; top-k needs a "
                                 "convolutional (N x C x H x W) or linear (N x C) layer")
        vals, flat = spatial_max(act)  # N x C
        return vals, _yx(flat, act), tuple(act.shape[1:])

    def update(self, act: torch.Tensor, ids: torch.Tensor) -> None:
        """Merge a batch of activations ``N x C (x H x W)`` of the images ``ids``.

        Once ``k`` candidates are held, a map's location is only looked up when its maximum can still enter (not
        below the unit's k-th value): the maxima alone are a cheap reduction, the locations a slow one."""
        if act.dim() != 4 or self.values is None or self.values.shape[1] < self.k:
            self.merge(*self.candidates(self.layer, act), ids)
            return
        vals = act.amax((2, 3))
        img, unit = (vals >= self.values[:, -1].to(vals.device)).nonzero(as_tuple=True)
        locs = torch.zeros(*vals.shape, 2, dtype=torch.long, device=vals.device)
        if len(img):
            locs[img, unit] = _yx(act[img, unit].flatten(1).argmax(1), act)  # the first strongest, as spatial_max
        self.merge(vals, locs, tuple(act.shape[1:]), ids)

    def merge(self, vals: torch.Tensor, locs: torch.Tensor, shape: tuple[int, ...], ids: torch.Tensor) -> None:
        """Merge candidates from :meth:`candidates` of the images ``ids``."""
        n, c = vals.shape
        cand_v, cand_i, cand_l = vals.T, ids.to(vals.device).expand(c, n), locs.transpose(0, 1)
        if self.values is None:
            self.shape = shape
        else:
            if shape != self.shape:
                raise DataError(f"layer {self.layer!r} output changed shape from {self.shape} to "
                                f"{shape}; give images of one size (resize them in preprocessing)")
            cand_v = torch.cat([self.values, cand_v], 1)
            cand_i = torch.cat([self.ids, cand_i], 1)
            cand_l = torch.cat([self.locs, cand_l], 1)
        self.values, self.ids, self.locs = select_top(cand_v, cand_i, cand_l, self.k)
        self.seen += n

    def result(self) -> TopKActivations:
        if self.values is None:
            raise ConvscopeError(f"no top-k candidates for layer {self.layer!r}; give a non-empty dataset")
        return TopKActivations(self.layer, self.values, self.ids, self.locs, self.shape, self.seen)

    def state_dict(self) -> dict[str, Any]:
        """The state as plain tensors and ints (``torch.save``-able with ``weights_only``)."""
        return {"values": self.values, "ids": self.ids, "locs": self.locs, "shape": list(self.shape),
                "seen": self.seen}

    @classmethod
    def from_state(cls, layer: str, k: int, state: Mapping[str, Any]) -> RunningTopK:
        """The state :meth:`state_dict` returned (``locations`` is accepted for ``locs``)."""
        t = cls(layer, k)
        t.values, t.ids = state["values"], state["ids"]
        t.locs = state["locs"] if "locs" in state else state["locations"]
        t.shape, t.seen = tuple(int(v) for v in state["shape"]), int(state["seen"])
        return t

    @classmethod
    def from_result(cls, result: TopKActivations, k: int) -> RunningTopK:
        """A state holding a finished :class:`TopKActivations` (e.g. one dataset shard's), on the CPU."""
        return cls.from_state(result.layer, k, {"values": result.values.float().cpu(), "ids": result.image_ids.cpu(),
                                                "locs": result.locations.cpu(), "shape": result.shape,
                                                "seen": result.images_seen})

    @classmethod
    def best(cls, parts: Sequence[RunningTopK], k: int) -> RunningTopK:
        """The ``k`` best candidates of the union of ``parts`` (disjoint sets of images)."""
        held = [p for p in parts if p.values is not None]
        if not held:
            raise ConvscopeError("no top-k candidates to merge; give a non-empty dataset")
        shapes = {p.shape for p in held}
        if len(shapes) > 1:
            raise ConvscopeError(f"a layer's output changed shape across images ({sorted(shapes)}); give images of "
                                 "one size")
        t = cls(held[0].layer, k)
        t.values, t.ids, t.locs = select_top(torch.cat([p.values for p in held if p.values is not None], 1),
                                             torch.cat([p.ids for p in held], 1),
                                             torch.cat([p.locs for p in held], 1), k)
        t.shape, t.seen = held[0].shape, sum(p.seen for p in held)
        return t

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, layer: str, k: int, data: bytes) -> RunningTopK:
        return cls.from_state(layer, k, torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))


def top_k_activations(model: nn.Module, images: Images, layers: str | Sequence[str], k: int = 9,
                      batch_size: BatchSize = "auto", progress: bool | None = None) -> dict[str, TopKActivations]:
    """The ``k`` strongest activations of every unit of each layer over a dataset (Zeiler & Fergus 2014, Fig. 2).

    Args:
        images: a tensor ``N x C x H x W`` (ids are positions), or an iterable of batches, each a tensor or a
            ``(tensor, integer ids)`` pair (a DataLoader of ``(images, labels)`` would read labels as ids:
            map it to images first).
        layers: one name, a comma-separated string or a list.
        k: activations kept per unit (fewer when the dataset has fewer images).
        batch_size: images per forward pass for a tensor input (an iterable's own batches are used as given);
            ``"auto"`` (default): see :mod:`convscope.core.batching`.
        progress: a progress bar with an ETA: ``True``, ``False``, or ``None`` (default: once the pass has run
            2 s; see :func:`~convscope.core.progress.progress_bar`).

    Returns ``{layer: TopKActivations}``; each unit's value is its spatial maximum in an image, so one image
    counts at most once per unit.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConvscopeError(f"top_k_activations(k={k!r}): use a positive int")
    names = list(resolve_layers(model, layers))
    check_batch_size(batch_size, "top_k_activations")
    if isinstance(images, torch.Tensor) and len(images):
        batch_size = resolve_batch_size(batch_size, model, images[:1], "top_k_activations", limit=len(images))
    elif batch_size == "auto":
        batch_size = 32  # an iterable brings its own batches
    state = {n: RunningTopK(n, k) for n in names}
    for ids, cands in stream_layers(model, images, names, batch_size, progress, reduce=RunningTopK.candidates,
                                    desc="top-k"):
        for n in names:
            vals, locs, shape = cast(tuple[torch.Tensor, torch.Tensor, tuple[int, ...]], cands[n])  # candidates()
            state[n].merge(vals, locs, shape, ids)
    if any(s.values is None for s in state.values()):
        raise ConvscopeError("top_k_activations got no images; pass a non-empty tensor or iterable of batches")
    return {n: s.result() for n, s in state.items()}


def dead_units(model: nn.Module, images: Images, layers: str | Sequence[str], tol: float = 0.0,
               batch_size: BatchSize = "auto", progress: bool | None = None) -> dict[str, DeadUnits]:
    """Units whose activation is never above ``tol`` at any position of any image, per layer.

    The same streaming pass as :func:`top_k_activations` (with ``k=1``, the dataset maximum); from a top-k result
    already computed use ``result.dead_units(tol)``.
    """
    found = top_k_activations(model, images, layers, k=1, batch_size=batch_size, progress=progress)
    return {n: r.dead_units(tol) for n, r in found.items()}


# --------------------------------------------------------------------------- receptive fields


def _input_channels(model: nn.Module) -> int:
    for m in model.modules():
        channels = getattr(m, "in_channels", None)
        if isinstance(channels, int):
            return channels
    return 3


def _analytic_boxes(chain: Chain, locations: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Boxes from the kernels, strides, paddings and dilations of the chain (going down: ``[a, b] -> [a s - p,
    b s - p + d (k - 1)]``), clipped to the image."""
    lo, hi = locations.clone(), locations.clone()  # L x 2: (y, x), inclusive bounds
    for step in reversed(chain.steps):
        m = step.module
        if isinstance(m, nn.Conv2d | nn.MaxPool2d):  # kinds "conv" and "pool" (kinds go by exact type)
            padding = m.padding
            assert not isinstance(padding, str), "a chain has no string padding"
            k = torch.tensor(_pair(m.kernel_size))
            s, p, d = torch.tensor(_pair(m.stride)), torch.tensor(_pair(padding)), torch.tensor(_pair(m.dilation))
            lo, hi = lo * s - p, hi * s - p + d * (k - 1)
        elif step.kind == "linear" or isinstance(m, nn.Flatten):  # a fully connected unit sees the whole image
            lo = torch.zeros_like(lo)
            hi = torch.full_like(hi, 10**9)
    top = torch.tensor(size) - 1
    lo, hi = lo.clamp(min=0).minimum(top), hi.clamp(min=0).minimum(top)
    return torch.cat([lo, hi + 1], dim=1)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _gradient_boxes(model: nn.Module, layer: str, locations: torch.Tensor, x: torch.Tensor,
                    batch_size: int) -> torch.Tensor:
    """Bounding boxes of the gradient's support: for each location, the input pixels that change the layer's
    output there (unioned over the random images ``x``, random channel weights)."""
    m, (h, w) = len(x), x.shape[-2:]
    boxes = torch.empty(len(locations), 4, dtype=torch.long)
    per = max(1, batch_size // m)
    gen = torch.Generator().manual_seed(0)
    with torch.enable_grad(), probe(model, layer, stop_after=layer) as p:
        for l0 in range(0, len(locations), per):
            locs = locations[l0:l0 + per]
            xx = x.repeat(len(locs), 1, 1, 1).clone().requires_grad_(True)
            p.forward(model, xx)
            act = p.activations[layer]
            sig = torch.zeros_like(act)
            rows = torch.arange(len(xx), device=act.device)
            loc = locs.repeat_interleave(m, dim=0)
            weights = torch.randn(len(xx), act.shape[1], generator=gen).to(act)
            if act.dim() == 4:
                sig[rows, :, loc[:, 0], loc[:, 1]] = weights
            else:
                sig[:] = weights
            (g,) = torch.autograd.grad(act, xx, grad_outputs=sig, allow_unused=True)
            p.clear()
            support = torch.zeros(len(xx), h, w, dtype=torch.bool) if g is None else (g != 0).any(1).cpu()
            support = support.view(len(locs), m, h, w).any(1)
            for j, s in enumerate(support):
                ys, xs = s.any(1).nonzero().flatten(), s.any(0).nonzero().flatten()
                if len(ys) == 0:  # nothing reaches the input (dead unit): the whole image
                    boxes[l0 + j] = torch.tensor([0, 0, h, w])
                else:
                    boxes[l0 + j] = torch.tensor([ys[0], xs[0], ys[-1] + 1, xs[-1] + 1])
    return boxes


class BoxCache(dict[tuple[int, int], torch.Tensor]):
    """Gradient receptive-field boxes by location ``(y, x)``. ``shifted``: ``True`` once every location's box was
    filled from translation equivariance (:func:`shifted_boxes`), ``False`` when its check failed (boxes are then
    found location by location), ``None`` while it was not tried."""

    shifted: bool | None = None


_BOXES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], BoxCache]] = weakref.WeakKeyDictionary()


def weights_version(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """Identity and in-place version counter of every parameter and buffer: changes whenever the weights do."""
    return tuple((t.data_ptr(), t._version) for t in [*model.parameters(), *model.buffers()])


def box_cache(model: nn.Module, layer: str, size: tuple[int, int], dtype: torch.dtype,
              device: torch.device) -> BoxCache:
    """The gradient receptive-field boxes already found for ``layer`` at input ``size``, by location ``(y, x)``:
    a box depends on (weights, layer, input size, location) only, so every call (every atlas chunk of units,
    every top-k row at the same location) shares it. Forgotten with the model, or when its weights change."""
    per_model = _BOXES.setdefault(model, {})
    key = (layer, size, dtype, str(device), weights_version(model))
    if key not in per_model:
        for old in [k for k in per_model if k[:4] == key[:4]]:  # stale weights
            del per_model[old]
        per_model[key] = BoxCache()
    return per_model[key]


def shifted_boxes(model: nn.Module, layer: str, shape: tuple[int, int], size: tuple[int, int], x: torch.Tensor,
                  batch_size: int, cache: BoxCache) -> bool:
    """Fill ``cache`` with the gradient box of every location of ``layer``'s ``shape`` map from translation
    equivariance: in a network of convolutions, pooling and element-wise operations a location's field is one box
    moved by the layer's stride per location and clipped to the image, ``[a + s y, b + s y)`` per axis.

    The gradient boxes (:func:`_gradient_boxes` on the random images ``x``) of four locations give every edge:
    the top / left edges at ``(h-2, w-2)`` and ``(h-1, w-1)`` (where they are least clipped), the bottom / right
    edges at ``(0, 0)`` and ``(1, 1)``; both values of an edge give its offset and the stride, or, when the inner
    one is clipped, the edge is clipped at every location but the last. The prediction is then checked against
    the gradient boxes of the other corners, the centre and its neighbour, and 3 random locations; on any
    difference (non-uniform strides, attention, size-dependent layers) nothing is filled and ``False`` is
    returned, so the boxes are found location by location. Returns ``True`` when every location was filled.
    """
    h, w = shape
    if h < 3 or w < 3:  # a map this small is cheap location by location
        return False
    gen = torch.Generator().manual_seed(1)
    rand = [(int(torch.randint(h, (1,), generator=gen)), int(torch.randint(w, (1,), generator=gen)))
            for _ in range(3)]
    basis = [(0, 0), (1, 1), (h - 2, w - 2), (h - 1, w - 1)]
    checks = [(0, w - 1), (h - 1, 0), ((h - 1) // 2, (w - 1) // 2), ((h - 1) // 2 + 1, (w - 1) // 2 + 1), *rand]
    locs = list(dict.fromkeys(basis + checks))
    missing = [loc for loc in locs if loc not in cache]
    if missing:
        found = _gradient_boxes(model, layer, torch.tensor(missing).to(x.device), x, batch_size)
        for loc, box in zip(missing, found):
            cache[loc] = box
    b = {loc: [int(v) for v in cache[loc]] for loc in basis}
    top = _clipped_line(b[(h - 2, w - 2)][0], b[(h - 1, w - 1)][0], h, 0)
    left = _clipped_line(b[(h - 2, w - 2)][1], b[(h - 1, w - 1)][1], w, 0)
    bottom = _clipped_line(b[(1, 1)][2], b[(0, 0)][2], h, size[0]).flip(0)
    right = _clipped_line(b[(1, 1)][3], b[(0, 0)][3], w, size[1]).flip(0)
    table = torch.stack([top[:, None].expand(h, w), left[None, :].expand(h, w),
                         bottom[:, None].expand(h, w), right[None, :].expand(h, w)], dim=-1)
    if any(not torch.equal(table[loc], cache[loc]) for loc in locs):
        return False
    for y in range(h):
        for x_ in range(w):
            cache.setdefault((y, x_), table[y, x_])
    return True


def _clipped_line(inner: int, outer: int, n: int, limit: int) -> torch.Tensor:
    """An edge at every location ``0 .. n-1`` of an axis, from its values at the last two (``inner`` at ``n - 2``,
    ``outer`` at ``n - 1``), where it is least clipped: the edge is ``a + s i`` clipped at ``limit`` (``0`` for a
    top / left edge; the image side for a bottom / right edge, whose locations are then counted from the other
    end). Both values unclipped give ``a`` and the stride ``s``; a clipped ``inner`` means the edge is clipped at
    every location but the last (it is monotone)."""
    i = torch.arange(n)
    if inner == limit:
        out = torch.full((n,), limit, dtype=torch.long)
        out[-1] = outer
        return out
    s = outer - inner
    line = outer - s * (n - 1 - i)
    return line.clamp(min=limit) if limit == 0 else line.clamp(max=limit)


def receptive_fields(model: nn.Module, layer: str, locations: torch.Tensor | Sequence[Sequence[int]],
                     input_size: tuple[int, int], method: str = "auto", batch_size: int = 32) -> torch.Tensor:
    """Input-pixel boxes ``L x 4`` = ``(top, left, bottom, right)``, half-open, of unit locations ``L x 2`` (y, x).

    ``method="analytic"``: from the chain of conv / pool kernels, strides, paddings and dilations (sequential
    networks: the explicit DeconvNet chain); ``"gradient"``: the bounding box of the gradient's support, unioned
    over 4 random images (any network; it can be smaller than the theoretical field where units are inactive on
    all of them, and it is the whole image for globally pooled or attention layers), one gradient pass per
    location; ``"auto"``: analytic where possible, else the gradient boxes of a few locations shifted to every
    location by translation equivariance where a check on more locations allows it (:func:`shifted_boxes`), else
    ``"gradient"``. Boxes are clipped to the image. Gradient boxes are computed once per (layer, input size,
    location) and kept with the model while its weights do not change (:func:`box_cache`).
    """
    if method not in ("auto", "analytic", "gradient"):
        raise ConvscopeError(f"receptive_field(method={method!r}): use 'auto', 'analytic' or 'gradient'")
    layer = list(resolve_layers(model, layer))[0]
    size = _pair(input_size)
    locs = torch.as_tensor(locations, dtype=torch.long).reshape(-1, 2).cpu()
    dev = next((t.device for t in model.parameters()), torch.device("cpu"))
    dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, _input_channels(model), *size, generator=gen).to(dev, dtype)  # replayed by build_chain
    chain = build_chain(model, x, layer) if method != "gradient" else "method='gradient' was asked for"
    if isinstance(chain, str) and method == "analytic":
        raise ConvscopeError(f"receptive_field(method='analytic'): {chain}; use method='gradient' (or 'auto')")
    act = layer_features(model, x, layer)[layer]
    shape = tuple(act.shape[2:]) if act.dim() == 4 else (1, 1)
    if len(locs) and ((locs < 0).any() or (locs >= torch.tensor(shape)).any()):
        raise ConvscopeError(f"location outside layer {layer!r}'s {shape[0]} x {shape[1]} map; "
                             f"give (y, x) with 0 <= y < {shape[0]}, 0 <= x < {shape[1]}")
    if isinstance(chain, Chain):
        return _analytic_boxes(chain, locs, size)
    if not len(locs):
        return torch.empty(0, 4, dtype=torch.long)
    distinct, back = torch.unique(locs, dim=0, return_inverse=True)  # top-k locations repeat: one pass each
    cache = box_cache(model, layer, size, dtype, dev)
    keys = [(int(y), int(x_)) for y, x_ in distinct.tolist()]
    try_shift = method == "auto" and cache.shifted is None
    missing = [i for i, key in enumerate(keys) if key not in cache]
    if try_shift or missing:  # random probe images only when some box is still to find
        rand = torch.randn(4, x.shape[1], *size, generator=gen).to(dev, dtype)
        if try_shift:
            cache.shifted = shifted_boxes(model, layer, (shape[0], shape[1]), size, rand, batch_size, cache)
            missing = [i for i, key in enumerate(keys) if key not in cache]
        if missing:
            found = _gradient_boxes(model, layer, distinct[missing].to(dev), rand, batch_size)
            for i, box in zip(missing, found):
                cache[keys[i]] = box
    return torch.stack([cache[key] for key in keys])[back]


def receptive_field(model: nn.Module, layer: str, location: tuple[int, int], input_size: tuple[int, int],
                    method: str = "auto") -> tuple[int, int, int, int]:
    """The input-pixel box ``(top, left, bottom, right)`` (half-open) of the unit at ``location`` = ``(y, x)`` of
    ``layer``'s feature map, for inputs of ``input_size`` = ``(height, width)``. See :func:`receptive_fields`."""
    box = receptive_fields(model, layer, [list(location)], input_size, method)[0]
    top, left, bottom, right = (int(v) for v in box)
    return top, left, bottom, right


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class TopKPatches:
    """What :func:`render_top_k` shows, per unit (outer list) and rank (inner list), strongest first.

    ``boxes``: ``U x k x 4`` receptive fields ``(top, left, bottom, right)``; ``patches``: the image crops in pixels
    ([0, 1]); ``projections``: the DeconvNet projections (signed, model input space) cropped to the same boxes, or
    None.
    """

    units: list[int]
    boxes: torch.Tensor
    patches: list[list[torch.Tensor]]
    projections: list[list[torch.Tensor]] | None


def top_k_patches(model: nn.Module, images: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
                  result: TopKActivations, units: Sequence[int] | None = None, projections: bool = True,
                  denormalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  batch_size: int = 32) -> TopKPatches:
    """The receptive-field crops of each unit's top-k activations and (``projections``) the DeconvNet projections
    of those same activations (``deconvnet(mode="max")``: the spatial maximum is the top-k location).

    ``images`` is the dataset the result was computed on (a tensor indexed by image id) or a function from an id
    tensor to the images ``n x C x H x W``; ``denormalize`` maps model inputs to pixels in [0, 1] (default:
    ``model.preprocess.denormalize`` when there is one).
    """
    n_units = result.values.shape[0]
    units = list(range(n_units)) if units is None else [int(u) for u in units]
    if not units or min(units) < 0 or max(units) >= n_units:
        raise ConvscopeError(f"render_top_k(units=...): give units in 0..{n_units - 1}")
    k = result.values.shape[1]
    ids = result.image_ids[units].reshape(-1).cpu()  # (U k)
    locs = result.locations[units].reshape(-1, 2).cpu()
    distinct, rows_img = torch.unique(ids, return_inverse=True)  # each image loaded and run forward once
    x = images(distinct) if callable(images) and not isinstance(images, torch.Tensor) else images[distinct]
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or len(x) != len(distinct):
        raise ConvscopeError("render_top_k(images=...): give the dataset tensor indexed by image id, or a function "
                             "from an id tensor to an n x C x H x W tensor")
    if denormalize is None:
        denormalize = input_denormalizer(model)
    boxes = receptive_fields(model, result.layer, locs, (x.shape[-2], x.shape[-1]), batch_size=batch_size)
    pixels = denormalize(x.detach()).clamp(0, 1)
    proj = None
    if projections:
        unit_rows = torch.tensor(units).repeat_interleave(k)
        proj = deconvnet_rows(model, x, result.layer, rows_img, unit_rows, mode="max", batch_size=batch_size)
    crops: list[list[torch.Tensor]] = []
    pcrops: list[list[torch.Tensor]] = []
    for j in range(len(units)):
        crops.append([])
        pcrops.append([])
        for r in range(j * k, (j + 1) * k):
            t, left, b, right = (int(v) for v in boxes[r])
            crops[j].append(pixels[int(rows_img[r]), :, t:b, left:right])
            if proj is not None:
                pcrops[j].append(proj[r, :, t:b, left:right])
    return TopKPatches(units, boxes.view(len(units), k, 4), crops, pcrops if proj is not None else None)


def render_top_k(model: nn.Module, images: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
                 result: TopKActivations, units: Sequence[int] | None = None, projections: bool = True,
                 denormalize: Callable[[torch.Tensor], torch.Tensor] | None = None, display: str = "signed",
                 scale: int | None = None, batch_size: int = 32) -> Image.Image:
    """Zeiler & Fergus Fig. 2: per unit (one grid row), the DeconvNet projections of its k strongest activations
    beside the image patches under their receptive fields, both cropped to the field (see :func:`top_k_patches`).

    ``display`` scales each projection for display (``to_display`` mode: ``"signed"`` or ``"percentile"``);
    ``scale`` enlarges crops (default: so that the largest is about 64 pixels).
    """
    found = top_k_patches(model, images, result, units, projections, denormalize, batch_size)
    return render_patches(found, display, scale)


def render_patches(found: TopKPatches, display: str = "signed", scale: int | None = None) -> Image.Image:
    """The Fig. 2 picture of :func:`render_top_k` from patches already found (:func:`top_k_patches`): one row per
    unit, its projections (when there are) beside its patches. ``scale`` default: the largest crop about 64 px."""
    if scale is None:
        side = int((found.boxes[..., 2:] - found.boxes[..., :2]).max())
        scale = max(1, 64 // max(1, side))
    nrow = math.ceil(math.sqrt(found.boxes.shape[1]))
    blocks = []
    for j in range(len(found.units)):
        if found.projections is not None:
            mode = cast(DisplayMode, display)  # to_display refuses any other mode
            shown = [to_display(p[None], mode)[0] for p in found.projections[j]]
            blocks.append(grid(shown, nrow=nrow, padding=1, scale=scale))
        blocks.append(grid(found.patches[j], nrow=nrow, padding=1, scale=scale))
    cols = ["deconvnet", "patches"] if found.projections is not None else ["patches"]
    return grid(blocks, nrow=len(cols), padding=4, row_labels=[f"unit {u}" for u in found.units], col_labels=cols)


__all__ = ["BoxCache", "DeadUnits", "TopKActivations", "TopKPatches", "box_cache", "dead_units", "receptive_field",
           "receptive_fields", "render_patches", "render_top_k", "shifted_boxes", "top_k_activations",
           "top_k_patches"]
