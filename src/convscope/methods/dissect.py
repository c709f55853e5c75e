"""Network Dissection: label every unit of a layer with the concept its top activations segment best.

Bau, Zhou, Khosla, Oliva & Torralba, "Network Dissection: Quantifying Interpretability of Deep Visual
Representations", CVPR 2017; the survey's Sec. 6.2.1, Eq. 18-19.  As in NetDissect-Lite's pipeline
(extract -> quantile -> tally -> report) the work is split in stages, each a plain function of tensors, with the
configuration passed explicitly in a frozen :class:`DissectConfig`:

1. **quantile** (:func:`unit_thresholds`, Eq. 18): the threshold ``T_f`` of every unit ``f`` with
   ``P(a_f > T_f) = quantile`` over all spatial positions of all images, at the layer's own resolution.  The
   result is *exact*: per unit only the ``k = n - floor((n - 1)(1 - quantile))`` largest values are kept (``n`` =
   images x positions), and ``T_f`` is interpolated from them exactly as ``numpy.quantile(a_f, 1 - quantile)``
   (``method="linear"``, NumPy's default, the one NetDissect-Lite's ``np.percentile`` uses).  Per batch only the
   values above each unit's current k-th largest (a lower bound of the final one) are kept, as (unit, value)
   pairs, and merged into the buffer once some unit has about ``k / 2`` waiting.  Memory: ``units x k x 4``
   bytes per layer, i.e. about ``quantile`` of the layer's activations over the whole dataset
   (``DissectConfig.max_buffer_mb`` caps it, with an error naming the fix).  For 1000 images of 56 x 56
   positions that is 15 681 floats per unit.
2. **tally** (:func:`tally_batch`, Eq. 19): each unit's map is upsampled bilinearly to the label resolution and
   thresholded, ``M_f = S_f > T_f``; for all units and all concepts at once we accumulate the intersections
   ``|M_f & L_c|``, the activated pixels ``|M_f|`` and the concept pixels ``|L_c|``.  Sparse and exact: an
   upsampled pixel is a convex combination of four cells, so only the output blocks around cells above ``T_f``
   (a few per cent) are interpolated (float64); a block whose labels are uniform adds its count to its label
   combination, and only blocks on label boundaries are counted pixel by pixel (one ``bincount`` over
   ``unit x label combination``, whatever the number of concepts or label layers).  Image-level labels (Broden's
   scenes) are whole-image masks and count through one ``units x images @ images x concepts`` product.
3. **IoU**: ``IoU_{f,c} = sum |M_f & L_c| / sum |M_f | L_c|``.  As in the authors' released code, the sums for a
   concept run over the images that carry annotations of that concept's category: ``|M_f|`` is only counted on
   images that have some label of that category (an image without texture labels says nothing about texture
   detectors).  NetDissect-Lite's ``tally_units_cat`` is slightly narrower: it counts an image's activated
   pixels for a category only when they overlap some label of that category in that image.  A unit is a
   *detector* of its best concept when ``IoU > iou_threshold`` (0.04).

Scale: memory is bounded by the batch (plus the exact quantile buffers): each layer's output is consumed inside its
forward hook, so only one layer's activations are alive at a time; images load in DataLoader workers while the model
runs; progress bars; with ``out=`` the pass-1 buffers / thresholds and the pass-2 partial counts are
written atomically every ``checkpoint_every`` batches, and a rerun with the same model, data and configuration picks
up where it stopped (a different configuration in the same folder is refused).
"""

from __future__ import annotations

import copy
import functools
import io
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.io import atomic_write_bytes, atomic_write_text
from ..core.layers import resolve_layers
from ..core.model import input_normalizer, lenient_preprocess, model_device, model_hash
from ..core.progress import progress_bar
from ..core.stream import stream_layers
from ..data.broden import BrodenDataset, broden_collate
from ..errors import ConvscopeError, DataError
from .topk import RunningTopK, TopKActivations

__all__ = [
    "ConceptSpace",
    "DissectConfig",
    "LayerDissection",
    "UnitLabel",
    "Comparison",
    "compare",
    "concept_space",
    "dissect",
    "iou_from_counts",
    "tally_batch",
    "unit_thresholds",
]


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DissectConfig:
    """Settings of :func:`dissect` (NetDissect-Lite's ``settings.py``, passed explicitly).

    Attributes:
        quantile: ``P(a_f > T_f)``, the top fraction of each unit's activations that forms its mask (Eq. 18).
        iou_threshold: a unit detects its best concept when ``IoU > iou_threshold``.
        batch_size: images per forward pass.
        seg_size: label maps are resized (nearest) to this (int or ``(h, w)``); None keeps the dataset's.
        image_size: when ``dataset`` is a path, images are resized to this; None: the model's preprocess size.
        categories: the concept categories to score (None: all in the dataset).
        split: when ``dataset`` is a path, only rows of this split (None: all).
        top_images: images kept per unit (largest spatial maximum) for reports.
        workers: DataLoader worker processes (0 loads in the main process).
        checkpoint_every: batches between atomic saves into ``out``.
        max_buffer_mb: cap on the exact quantile buffers of one layer (MiB).
    """

    quantile: float = 0.005
    iou_threshold: float = 0.04
    batch_size: int = 16
    seg_size: int | tuple[int, int] | None = None
    image_size: int | tuple[int, int] | None = None
    categories: tuple[str, ...] | None = None
    split: str | None = None
    top_images: int = 8
    workers: int = 1
    checkpoint_every: int = 20
    max_buffer_mb: float = 4096.0

    def __post_init__(self) -> None:
        if not 0.0 < float(self.quantile) < 1.0:
            raise ConvscopeError(f"DissectConfig(quantile={self.quantile!r}): use a fraction in (0, 1), e.g. 0.005")
        if not 0.0 <= float(self.iou_threshold) < 1.0:
            raise ConvscopeError(f"DissectConfig(iou_threshold={self.iou_threshold!r}): use a value in [0, 1), "
                                 "e.g. 0.04")
        for name in ("batch_size", "top_images", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConvscopeError(f"DissectConfig({name}={v!r}): use a positive int")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ConvscopeError(f"DissectConfig(workers={self.workers!r}): use an int >= 0")
        if self.categories is not None:
            object.__setattr__(self, "categories", tuple(self.categories))
        for name in ("seg_size", "image_size"):
            v = getattr(self, name)
            if v is not None:
                pair = (v, v) if isinstance(v, int) else tuple(v)
                if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
                    raise ConvscopeError(f"DissectConfig({name}={v!r}): use a positive int or an (h, w) pair")
                object.__setattr__(self, name, pair)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change results (a resumed run must match them)."""
        d = asdict(self)
        for k in ("workers", "checkpoint_every", "max_buffer_mb"):
            d.pop(k)
        return json.loads(json.dumps(d))


# --------------------------------------------------------------------------- concepts


@dataclass(frozen=True)
class ConceptSpace:
    """The concepts scored: one column per label number of the chosen categories.

    ``numbers[c]``, ``names[c]``, ``category[c]`` (primary category of the concept); ``lut`` maps a label number to
    its column (``C`` = none); ``labelcat`` is ``C x K`` (concept c belongs to category k); ``categories`` are the
    K chosen categories, ``pixel_categories`` / ``image_categories`` their kinds in the dataset.
    """

    numbers: list[int]
    names: list[str]
    category: list[str]
    categories: list[str]
    pixel_categories: list[str]
    image_categories: list[str]
    lut: torch.Tensor
    labelcat: torch.Tensor

    def __len__(self) -> int:
        return len(self.numbers)


def concept_space(dataset: BrodenDataset, categories: Sequence[str] | None = None) -> ConceptSpace:
    """The concept columns of ``dataset`` for ``categories`` (default: all its categories)."""
    cats = list(dataset.categories if categories is None else categories)
    unknown = [c for c in cats if c not in dataset.categories]
    if unknown:
        raise DataError(f"categories {unknown} are not loaded from {dataset.root} (it has "
                        f"{', '.join(dataset.categories)}); pick from those")
    numbers = sorted({n for c in cats for n in dataset.category_labels[c]})
    if not numbers:
        raise DataError(f"categories {cats} of {dataset.root} list no labels; pick categories with labels")
    lut = torch.full((len(dataset.labels),), len(numbers), dtype=torch.int64)
    lut[torch.tensor(numbers)] = torch.arange(len(numbers))
    labelcat = torch.zeros(len(numbers), len(cats), dtype=torch.bool)
    for k, c in enumerate(cats):
        labelcat[lut[torch.tensor(dataset.category_labels[c])], k] = True
    primary = []
    for j, n in enumerate(numbers):
        lab = dataset.labels[n]
        primary.append(lab.category if lab.category in cats and labelcat[j, cats.index(lab.category)]
                       else cats[int(labelcat[j].nonzero()[0])])
    return ConceptSpace(numbers, [dataset.labels[n].name for n in numbers], primary, cats,
                        [c for c in cats if c in dataset.pixel_categories],
                        [c for c in cats if c in dataset.image_categories], lut, labelcat)


@dataclass(frozen=True)
class BatchLabels:
    """A batch's concept annotations: ``cols`` ``N x L x P`` concept column of each pixel in each label layer
    (``C`` = none; a concept repeated at one pixel in two layers counts once), ``image_level`` ``N x C`` whole-image
    concepts, ``annotated`` ``N x C`` (the image has labels of the concept's category), ``truth`` ``C`` concept
    pixels, ``size`` the label resolution."""

    cols: torch.Tensor
    image_level: torch.Tensor
    annotated: torch.Tensor
    truth: torch.Tensor
    size: tuple[int, int]
    _blocks: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, compare=False,
                                                                              repr=False)

    @functools.cached_property
    def combos(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(combo, pair_combo, pair_concept)``: each pixel's combination of concepts over the label layers as one
        id (``N x P``), and the (combination, concept) pairs that say which concepts each combination holds, so that
        intersections are counted per combination (one key per pixel, however many label layers) and then added to
        their concepts (a few pairs per combination, however many concepts the dataset has)."""
        n, layers, p = self.cols.shape
        c = self.image_level.shape[1]
        key = torch.zeros(n * p, dtype=torch.long)
        table = torch.zeros(1, 0, dtype=torch.long)  # K x layers so far: the concept of each layer
        for lay in range(layers):
            uniq, key = torch.unique(key * (c + 1) + self.cols[:, lay].reshape(-1), return_inverse=True)
            table = torch.cat([table[uniq // (c + 1)], (uniq % (c + 1))[:, None]], 1)
        pair_combo, layer = (table < c).nonzero(as_tuple=True)  # a concept repeated across layers is already C
        return key.view(n, p), pair_combo, table[pair_combo, layer]

    def block_combos(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For a ``h x w`` map upsampled to :attr:`size`: ``(uniform, ids)``. ``ids`` (``N x h x w x my x mx``) are
        the combination ids of each cell's output block (see :func:`_bilinear_axis`; pads repeat a pixel of the
        block); ``uniform`` (``N x h x w``) is the block's one id, or -1 where labels change inside it."""
        if (h, w) not in self._blocks:
            combo = self.combos[0].view(-1, *self.size)
            rows, _, _, _ = _bilinear_axis(h, self.size[0])
            cols, _, _, _ = _bilinear_axis(w, self.size[1])
            empty = (rows[:, 0] < 0)[:, None] | (cols[:, 0] < 0)[None, :]  # cells that start no output pixel
            rows = torch.where(rows >= 0, rows, rows[:, :1]).clamp(min=0)
            cols = torch.where(cols >= 0, cols, cols[:, :1]).clamp(min=0)
            ids = combo[:, rows][:, :, :, cols].permute(0, 1, 3, 2, 4).contiguous()  # N x h x w x my x mx
            lo, hi = ids.flatten(3).aminmax(dim=3)  # (amin / amax over two small dims are 10-30x slower)
            self._blocks[(h, w)] = (torch.where((lo == hi) & ~empty, lo, -1), ids)
        return self._blocks[(h, w)]


def batch_labels(batch: Mapping[str, Any], space: ConceptSpace, size: tuple[int, int] | None = None) -> BatchLabels:
    """Concept annotations of one :func:`~convscope.data.broden.broden_collate` batch, for :func:`tally_batch`."""
    n = len(batch["index"])
    c = len(space)
    segs = [batch["seg"][cat] for cat in space.pixel_categories if cat in batch["seg"]]
    if size is None:
        if not segs:
            raise DataError("the batch has no pixel-level labels, so the label resolution is unknown; "
                            "set DissectConfig(seg_size=...)")
        size = tuple(segs[0].shape[-2:])  # type: ignore[assignment]
    h, w = size  # type: ignore[misc]
    has_cat = torch.zeros(n, len(space.categories), dtype=torch.bool)
    layers = []
    for k, cat in enumerate(space.categories):
        if cat in space.pixel_categories and cat in batch["seg"]:
            s = batch["seg"][cat]
            if tuple(s.shape[-2:]) != (h, w):
                raise DataError(f"{cat} label maps are {tuple(s.shape[-2:])}, others {(h, w)}; open the dataset "
                                "with seg_size= (or set DissectConfig(seg_size=...))")
            has_cat[:, k] = (s != 0).flatten(1).any(1)
            layers.append(s)
        elif cat in space.image_categories:
            has_cat[:, k] = torch.tensor([bool(v) for v in batch["labels_image_level"][cat]], dtype=torch.bool)
    labels = torch.cat(layers, 1) if layers else torch.zeros(n, 0, h, w, dtype=torch.int64)
    cols = space.lut[labels.clamp(0, len(space.lut) - 1)].flatten(2)  # N x L x P
    for i in range(1, cols.shape[1]):  # a concept in two layers of one pixel is one pixel of that concept
        for j in range(i):
            dup = cols[:, i] == cols[:, j]
            cols[:, i][dup] = c
    image_level = torch.zeros(n, c, dtype=torch.float64)
    for cat in space.image_categories:
        for r, nums in enumerate(batch["labels_image_level"][cat]):
            for num in nums:
                col = int(space.lut[num]) if 0 <= num < len(space.lut) else c
                if col < c:
                    image_level[r, col] = 1.0
    annotated = (has_cat.double() @ space.labelcat.double().T) > 0
    truth = torch.bincount(cols.flatten(), minlength=c + 1)[:c].double() + h * w * image_level.sum(0)
    return BatchLabels(cols, image_level, annotated, truth, (h, w))


# --------------------------------------------------------------------------- pass 1: quantile thresholds


class TopBuffer:
    """Per unit, the ``k`` largest of ``n`` values, enough for the exact upper ``quantile`` (see module doc).

    The buffer is unordered (``topk(sorted=False)`` is a selection, four times cheaper than the sorted one); its row
    minimum is each unit's k-th largest so far, the bound below which later values are dropped.
    """

    def __init__(self, n: int, quantile: float, units: int, max_mb: float, layer: str) -> None:
        self.n, self.q = n, float(quantile)
        self.lo = math.floor((n - 1) * (1.0 - self.q))  # numpy's virtual index, integer part
        self.k = n - self.lo
        mb = units * self.k * 4 / 2**20
        if mb > max_mb:
            raise ConvscopeError(
                f"layer {layer!r}: the exact quantile needs {mb:.0f} MiB ({units} units x {self.k} values); raise "
                f"DissectConfig(max_buffer_mb=...) above that, or dissect fewer images or a smaller seg/image size")
        self._values: torch.Tensor | None = None  # units x (up to k), unordered
        self._bound: torch.Tensor | None = None  # its row minimum, once full
        self._units: list[torch.Tensor] = []  # candidates above the bound at the last merge: unit ids
        self._pending: list[torch.Tensor] = []  # ... and their values
        self._waiting = torch.zeros(units, dtype=torch.int64)  # candidates waiting, per unit

    @property
    def empty(self) -> bool:
        """No value seen yet."""
        return self._values is None

    def state(self) -> dict[str, torch.Tensor]:
        """Everything held, for a checkpoint (:meth:`from_state` restores it)."""
        self._merge()
        return {"n": torch.tensor(self.n), "values": self._values}

    @classmethod
    def from_state(cls, s: Mapping[str, torch.Tensor], quantile: float, max_mb: float, layer: str) -> TopBuffer:
        buf = cls(int(s["n"]), quantile, len(s["values"]), max_mb, layer)
        buf._set(s["values"])
        return buf

    @property
    def values(self) -> torch.Tensor | None:
        """``units x k``: each unit's largest values so far, descending (waiting candidates merged first)."""
        self._merge()
        return None if self._values is None else self._values.sort(dim=1, descending=True).values

    def _set(self, v: torch.Tensor) -> None:
        self._values = v
        self._bound = v.amin(1) if v.shape[1] == self.k else None

    def _merge(self) -> None:
        if not self._pending or self._values is None:
            return
        units, vals = torch.cat(self._units).long(), torch.cat(self._pending)
        order = torch.argsort(units)
        units, vals = units[order], vals[order]
        counts = torch.bincount(units, minlength=self._values.shape[0])
        rank = torch.arange(len(units), device=units.device) - (counts.cumsum(0) - counts)[units]
        pad = torch.full((self._values.shape[0], int(counts.max())), -math.inf, device=vals.device)
        pad[units, rank] = vals  # units x most-waiting, each unit's candidates left-aligned
        self._set(torch.cat([self._values, pad], 1).topk(self.k, dim=1, sorted=False).values)
        self._units, self._pending = [], []
        self._waiting.zero_()

    def update(self, act: torch.Tensor) -> None:
        """Add a batch ``N x units (x H x W)``."""
        x = act.detach().float()
        if x.dim() == 2:
            x = x[:, :, None, None]
        if self._bound is not None:
            # a value not above the k-th largest (as of the last merge: a lower bound of the current one) can never
            # enter the final k: only the few above it wait, as (unit, value) pairs (read in memory order); the
            # buffer is re-selected once some unit has k / 2 waiting, so it is not re-selected every batch
            u = len(self._bound)
            if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
                x = x.permute(0, 2, 3, 1).reshape(-1, u)  # memory order: units last
                over = x > self._bound
            else:
                x = x.reshape(x.shape[0], u, -1)  # units first (a copy only if the layout is unusual)
                over = x > self._bound[:, None]
            at = over.view(-1).nonzero().squeeze(1)  # a flat scan: far cheaper than a masked select
            if len(at):
                units = at % u if over.dim() == 2 else (at // over.shape[2]) % u
                self._units.append(units.to(torch.int32))  # half the memory of the waiting pairs
                self._pending.append(x.reshape(-1)[at])
                self._waiting += torch.bincount(units, minlength=u).cpu()
                if int(self._waiting.max()) >= max(1, self.k // 2):
                    self._merge()
            return
        v = x.transpose(0, 1).reshape(x.shape[1], -1)
        if self._values is not None:
            v = torch.cat([self._values, v], 1)
        self._set(v.topk(min(self.k, v.shape[1]), dim=1, sorted=False).values)

    def thresholds(self) -> torch.Tensor:
        """``numpy.quantile(a_f, 1 - quantile)`` (linear interpolation) per unit, float64."""
        self._merge()
        assert self._values is not None
        low = self._values.topk(min(2, self._values.shape[1]), dim=1, largest=False).values.double()
        pos = (self.n - 1) * (1.0 - self.q)
        frac = pos - self.lo
        x_lo = low[:, 0]  # ascending index lo = the k-th largest = the buffer's minimum
        if self.lo + 1 > self.n - 1:
            return x_lo
        x_hi = low[:, 1]  # ascending index lo + 1 = the (k-1)-th largest
        return x_lo + frac * (x_hi - x_lo)


def float32_below(t: torch.Tensor) -> torch.Tensor:
    """The largest float32 values ``<= t`` (float64): for float32 ``a``, ``a > t`` iff ``a > float32_below(t)``."""
    t32 = t.float()
    over = t32.double() > t
    return torch.where(over, torch.nextafter(t32, torch.tensor(-math.inf)), t32)


# --------------------------------------------------------------------------- pass 2: tally

_TALLY_CHUNK = 1 << 22  # float64 values interpolated at once (32 MiB per temporary)


@functools.lru_cache(maxsize=64)
def _bilinear_axis(src: int, dst: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One axis of ``F.interpolate(mode="bilinear", align_corners=False)`` from ``src`` to ``dst`` samples, grouped by
    source cell: ``(pixels, weights, count, step)``; ``pixels`` / ``weights`` are ``src x m`` (``m`` the most output
    samples one cell starts, -1 / 0 pads), ``count`` / ``step`` have ``src`` entries.

    Output sample ``y`` reads cells ``i = floor(s)`` and ``i + step[i]`` with weights ``1 - l`` and ``l``, where
    ``s = max((y + 0.5) src / dst - 0.5, 0)`` and ``l = s - i`` (PyTorch's ``area_pixel_compute_source_index``);
    ``pixels[i]`` lists the ``count[i]`` samples ``y`` whose first cell is ``i``, ``weights[i]`` their ``l``.
    """
    y = torch.arange(dst, dtype=torch.float64)
    s = ((y + 0.5) * (src / dst) - 0.5).clamp(min=0.0)
    first = s.floor().long().clamp(max=src - 1)
    lam = s - first
    count = torch.bincount(first, minlength=src)
    rank = torch.arange(dst) - torch.searchsorted(first, first)  # position among the samples of its cell
    pixels = torch.full((src, int(count.max())), -1, dtype=torch.long)
    weights = torch.zeros(src, int(count.max()), dtype=torch.float64)
    pixels[first, rank] = torch.arange(dst)
    weights[first, rank] = lam
    return pixels, weights, count, (torch.arange(src) < src - 1).long()


def _hot_blocks(act: torch.Tensor, t: torch.Tensor, size: tuple[int, int]
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``S_f > T_f`` (``S_f`` = ``act`` upsampled bilinearly to ``size``) where it can be true, as blocks
    ``(image, unit, i, j, mask)``: ``mask[q]`` (``my x mx``) covers the output pixels ``rows[i] x cols[j]`` of
    :func:`_bilinear_axis` (those whose first source cell is ``(i, j)``); the blocks partition the output.

    An output pixel is a convex combination of its four source cells (the *quad* ``(i, j)``, ``(i + 1, j)``,
    ``(i, j + 1)``, ``(i + 1, j + 1)``; Eq. 19's upsampling), so it can exceed ``T_f`` only when one of them does.
    Only quads with a cell above the threshold (a few per cent at ``quantile = 0.005``) are interpolated, separably
    and in float64: exact for power-of-two scale factors (the weights are short binary fractions), within an ulp of
    exact otherwise.  Blocks with the same number of rows and columns come together (no padding).
    """
    if not (act.is_contiguous() or act.is_contiguous(memory_format=torch.channels_last)):
        act = act.contiguous()
    n, u, h, w = act.shape
    flat, (sn, su, sh, sw) = act.as_strided((act.numel(),), (1,)), act.stride()  # cells by offset into storage
    hot = act > float32_below(t).float().to(act.device)[None, :, None, None]  # the cells above T_f
    quad = hot
    if (h, w) != size:  # quad (i, j) is hot when any of its cells is: OR with the next row, then the next column
        quad = hot.clone()
        quad[:, :, :-1] |= hot[:, :, 1:]
        quad[:, :, :, :-1] |= quad[:, :, :, 1:].clone()
    img, unit, i, j = quad.nonzero(as_tuple=True)
    _, row_l, row_n, row_step = (v.to(act.device) for v in _bilinear_axis(h, size[0]))
    _, col_l, col_n, col_step = (v.to(act.device) for v in _bilinear_axis(w, size[1]))
    t64 = t.to(device=act.device, dtype=torch.float64)
    base = int(col_n.max()) + 1
    shape_of = row_n[i] * base + col_n[j]
    order = torch.argsort(shape_of)
    img, unit, i, j, shape_of = img[order], unit[order], i[order], j[order], shape_of[order]
    keys, counts = torch.unique_consecutive(shape_of, return_counts=True)
    end = 0
    for key, count in zip(keys.tolist(), counts.tolist()):
        start, end = end, end + count
        my, mx = divmod(key, base)
        if not my or not mx:  # cells that start no output pixel (when downsampling)
            continue
        step = max(1, _TALLY_CHUNK // (my * mx))  # bounds the float64 temporaries
        for s in range(start, end, step):
            part = slice(s, min(s + step, end))
            gi, gu, qi, qj = img[part], unit[part], i[part], j[part]
            at = gi * sn + gu * su + qi * sh + qj * sw  # the quad's four cells, by offset into the storage
            right, down = col_step[qj] * sw, row_step[qi] * sh
            c00, c01 = flat[at].double()[:, None], flat[at + right].double()[:, None]
            c10, c11 = flat[at + down].double()[:, None], flat[at + down + right].double()[:, None]
            lx, ly = col_l[qj, :mx], row_l[qi, :my, None]
            top, bottom = c00 * (1 - lx) + c01 * lx, c10 * (1 - lx) + c11 * lx
            val = top[:, None, :] * (1 - ly) + bottom[:, None, :] * ly  # quads x my x mx
            yield gi, gu, qi, qj, val > t64[gu][:, None, None]


def tally_batch(act: torch.Tensor, thresholds: torch.Tensor, labels: BatchLabels
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 19 counts of one batch for all units and concepts: ``(intersection U x C, activated U x C, sizes N x U)``.

    ``act`` is the layer's output ``N x U x h x w`` (or ``N x U``); it is upsampled bilinearly to the label size
    (``F.interpolate(mode="bilinear", align_corners=False)``) and thresholded, ``> thresholds``.  ``activated[f, c]``
    counts ``|M_f|`` on the images annotated for ``c``'s category; ``sizes[i, f]`` is ``|M_f|`` in image ``i``.

    Only the pixels that can pass are computed (:func:`_hot_blocks`), and the counts equal thresholding the whole
    upsampled batch.  Intersections are counted per block: a block whose labels are uniform adds its activated
    pixel count to its label combination (:meth:`BatchLabels.block_combos`); only blocks on a label boundary are
    counted pixel by pixel.  Combinations reach their concepts through (combination, concept) pairs
    (:attr:`BatchLabels.combos`); image-level labels (Broden's scenes) are whole-image masks, one
    ``units x images @ images x concepts`` product.
    """
    if act.dim() == 2:
        act = act[:, :, None, None]
    if act.dim() != 4:
        raise ConvscopeError(f"dissection needs a convolutional (N x C x H x W) or linear layer, got shape "
                             f"{tuple(act.shape)}")
    act = act.detach().float()
    n, u, h, w = act.shape
    combo, pair_combo, pair_concept = labels.combos
    k = int(combo.max()) + 1 if combo.numel() else 1
    block, block_ids = labels.block_combos(h, w)
    block = block.to(act.device)
    sizes = torch.zeros(n * u, dtype=torch.float64)
    inter_k = torch.zeros(u * k, dtype=torch.float64)
    for img, unit, i, j, mask in _hot_blocks(act, thresholds.to(torch.float64), labels.size):
        cnt = mask.sum((1, 2)).double().cpu()
        img, unit, i, j, bc = img.cpu(), unit.cpu(), i.cpu(), j.cpu(), block[img, i, j].cpu()
        sizes.index_add_(0, img * u + unit, cnt)
        uniform = bc >= 0
        inter_k.index_add_(0, (unit * k + bc)[uniform], cnt[uniform])
        mixed = (~uniform).nonzero().squeeze(1)
        if len(mixed):  # label boundaries: the block's combination ids, pixel by pixel, where the mask is on
            my, mx = mask.shape[1:]
            q, r, c = mask[mixed.to(mask.device)].nonzero(as_tuple=True)
            q, r, c = mixed[q.cpu()], r.cpu(), c.cpu()
            big_y, big_x = block_ids.shape[3:]
            ids = block_ids.view(-1)[(((img[q] * h + i[q]) * w + j[q]) * big_y + r) * big_x + c]
            keys = unit[q] * k + ids
            inter_k += torch.bincount(keys, minlength=u * k).double()
    sizes = sizes.view(n, u)
    inter = sizes.T @ labels.image_level  # image-level concepts: the whole image is the mask
    inter.index_add_(1, pair_concept, inter_k.view(u, k)[:, pair_combo])  # each combination to its concepts
    activated = sizes.T @ labels.annotated.double()
    return inter, activated, sizes


def iou_from_counts(inter: torch.Tensor, activated: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """``IoU = I / (|M| + |L| - I)`` (0 where both are empty), ``U x C`` float64."""
    union = activated + truth[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class UnitLabel:
    """One unit's dissection: its best concept ``label`` (of ``category``), that ``iou``, the unit's ``threshold``
    ``T_f`` and whether it is a detector (``iou > iou_threshold``)."""

    unit: int
    label: str
    category: str
    iou: float
    threshold: float
    detector: bool


@dataclass(frozen=True)
class LayerDissection:
    """Network Dissection of one layer.

    ``rows``: one :class:`UnitLabel` per unit; ``iou``: the full ``units x concepts`` matrix; ``concepts``,
    ``concept_numbers``, ``concept_categories`` name its columns; ``intersection``, ``activated`` (``|M_f|`` on
    images annotated for the concept's category) and ``truth`` (``|L_c|``) are the counts behind it;
    ``top_images`` / ``top_values``: each unit's strongest images (dataset indices) by spatial maximum.
    """

    layer: str
    rows: list[UnitLabel]
    iou: torch.Tensor
    concepts: list[str]
    concept_numbers: list[int]
    concept_categories: list[str]
    categories: list[str]
    thresholds: torch.Tensor
    intersection: torch.Tensor
    activated: torch.Tensor
    truth: torch.Tensor
    top_images: torch.Tensor
    top_values: torch.Tensor
    images: int
    quantile: float
    iou_threshold: float
    seg_size: tuple[int, int] = (0, 0)
    shape: tuple[int, ...] = field(default=())

    def detectors(self) -> list[UnitLabel]:
        """The detector units (``iou > iou_threshold``), best IoU first."""
        return sorted((r for r in self.rows if r.detector), key=lambda r: -r.iou)

    def summary(self) -> dict[str, int]:
        """Unique detectors per category: distinct concepts detected by at least one unit (Bau et al. Fig. 5;
        survey Fig. 17 left)."""
        out = {c: 0 for c in self.categories}
        for cat, _ in {(r.category, r.label) for r in self.rows if r.detector}:
            out[cat] += 1
        return out

    def detector_counts(self) -> dict[str, int]:
        """Detector units per category (a concept detected by three units counts three times)."""
        out = {c: 0 for c in self.categories}
        for r in self.rows:
            if r.detector:
                out[r.category] += 1
        return out

    def table(self) -> list[dict[str, Any]]:
        """One dict per unit (unit, label, category, iou, threshold, detector), for CSV/JSON."""
        return [asdict(r) for r in self.rows]


def _layer_result(layer: str, space: ConceptSpace, thresholds: torch.Tensor, inter: torch.Tensor,
                  activated: torch.Tensor, truth: torch.Tensor, top: TopKActivations, config: DissectConfig,
                  seg_size: tuple[int, int]) -> LayerDissection:
    iou = iou_from_counts(inter, activated, truth)
    best = iou.argmax(1) if iou.shape[1] else torch.zeros(iou.shape[0], dtype=torch.long)
    rows = []
    for u in range(iou.shape[0]):
        c = int(best[u])
        v = float(iou[u, c])
        rows.append(UnitLabel(u, space.names[c], space.category[c], v, float(thresholds[u]),
                              v > config.iou_threshold))
    return LayerDissection(layer, rows, iou, list(space.names), list(space.numbers), list(space.category),
                           list(space.categories), thresholds, inter, activated, truth, top.image_ids, top.values,
                           top.images_seen, float(config.quantile), float(config.iou_threshold), seg_size,
                           tuple(top.shape))


# --------------------------------------------------------------------------- streaming and resuming


def open_dataset(dataset: BrodenDataset | str | os.PathLike[str], model: nn.Module | None,
                 config: DissectConfig) -> BrodenDataset:
    """``dataset`` as a :class:`BrodenDataset` with ``config.seg_size`` (a copy when it must change)."""
    if isinstance(dataset, str | os.PathLike):
        size = config.image_size
        if size is None and model is not None:
            size = lenient_preprocess(model).input_size
        return BrodenDataset(dataset, categories=config.categories, split=config.split, size=size,
                             seg_size=config.seg_size)
    if not isinstance(dataset, BrodenDataset):
        raise DataError(f"dissect(dataset=...) needs a BrodenDataset or a Broden folder path, got "
                        f"{type(dataset).__name__}; generate one with convscope.data.synthetic.generate(out)")
    if config.seg_size is not None and dataset.seg_size != config.seg_size:
        dataset = copy.copy(dataset)
        dataset.seg_size = config.seg_size
    return dataset


def stream_dataset(model: nn.Module, dataset: BrodenDataset, layers: Sequence[str], batch_size: int, workers: int,
                   start_batch: int = 0, desc: str = "dissect", progress: bool | None = True,
                   reduce: Callable[[Mapping[str, Any], str, torch.Tensor], Any] | None = None
                   ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """``(collated batch, {layer: activations})`` per batch from ``start_batch`` on, images loaded by
    ``workers`` DataLoader processes while the model runs (through :func:`~convscope.methods.topk.stream_layers`);
    images are mapped to the model's input space with ``model.preprocess.normalize`` when it has one.

    With ``reduce``, ``reduce(batch, layer, activation)`` runs inside the forward hook, as each layer's output
    appears, and its value replaces the activation: the activation is used while it is still in cache and freed as
    soon as the next layer has consumed it (on lite0 13 % faster and 560 MB less than keeping all 49 layers).  A
    layer that runs twice in one forward pass (a shared module) is refused there, since its two outputs would both
    be counted."""
    from torch.utils.data import DataLoader, Subset

    total = math.ceil(len(dataset) / batch_size)
    first = start_batch * batch_size
    if first >= len(dataset):
        return
    loader = DataLoader(Subset(dataset, range(first, len(dataset))), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=broden_collate, persistent_workers=False)
    norm, dev = input_normalizer(model), model_device(model)
    held: dict[str, Any] = {}

    def images() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in progress_bar(loader, total=total, initial=start_batch, desc=desc, unit="batch", progress=progress):
            held["batch"], held["ran"] = b, set()
            yield norm(b["images"]).to(dev), b["index"]

    def hook(layer: str, act: torch.Tensor) -> Any:
        if layer in held["ran"]:
            raise ConvscopeError(f"layer {layer!r} runs more than once per forward pass (a module shared by several "
                                 "places in the network); dissect a module that runs once, e.g. a separate "
                                 "activation module for each place")
        held["ran"].add(layer)
        assert reduce is not None
        return reduce(held["batch"], layer, act)

    for _, acts in stream_layers(model, images(), list(layers), batch_size, progress=False,
                                 reduce=hook if reduce is not None else None):
        yield held["batch"], acts


class _Store:
    """The resumable state of a run in ``out``: ``dissect_meta.json`` plus ``pass1.pt`` / ``pass2.pt``."""

    def __init__(self, out: str | os.PathLike[str], meta: dict[str, Any]) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "dissect_meta.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if old != meta:
                diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
                raise ConvscopeError(f"{self.out} holds a dissection with a different {', '.join(diff)}; pass another "
                                     "out folder, or delete this one to start over")
        else:
            atomic_write_text(path, json.dumps(meta, indent=1))

    def load(self, name: str) -> dict[str, Any] | None:
        path = self.out / f"{name}.pt"
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged state file: say which, and how to recover
            raise ConvscopeError(f"{path} cannot be read ({type(exc).__name__}: {exc}); delete it to recompute "
                                 "that pass") from None

    def save(self, name: str, state: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.out / f"{name}.pt", buf.getvalue())


def _restore_top(layer: str, k: int, s: Mapping[str, Any]) -> RunningTopK:
    t = RunningTopK(layer, k)
    t.values, t.ids, t.locs = s["values"], s["ids"], s["locs"]
    t.shape, t.seen = tuple(int(v) for v in s["shape"]), int(s["seen"])
    return t


def _pass_thresholds(model: nn.Module, ds: BrodenDataset, names: list[str], config: DissectConfig,
                     store: _Store | None, show: bool | None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, TopKActivations]]:
    state = store.load("pass1") if store else None
    if state and state.get("done"):
        tops = {n: _restore_top(n, config.top_images, state["top"][n]).result() for n in names}
        return dict(state["thresholds"]), tops
    start = int(state["batches"]) if state else 0
    bufs: dict[str, TopBuffer] = {}
    tops: dict[str, RunningTopK] = {n: RunningTopK(n, config.top_images) for n in names}
    if state:
        for n in names:
            tops[n] = _restore_top(n, config.top_images, state["top"][n])
            bufs[n] = TopBuffer.from_state(state["buffers"][n], config.quantile, config.max_buffer_mb, n)
    batches = start

    def snapshot(done: bool) -> dict[str, Any]:
        s: dict[str, Any] = {
            "batches": batches, "done": done, "buffers": {n: bufs[n].state() for n in names},
            "top": {n: {"values": t.values, "ids": t.ids, "locs": t.locs, "shape": list(t.shape), "seen": t.seen}
                    for n, t in tops.items()},
        }
        if done:
            s["thresholds"] = {n: bufs[n].thresholds() for n in names}
        return s

    def on_layer(batch: Mapping[str, Any], n: str, act: torch.Tensor) -> None:
        if n not in bufs:  # n = images x positions (a linear layer has one)
            bufs[n] = TopBuffer(len(ds) * act[0, 0].numel(), config.quantile, act.shape[1], config.max_buffer_mb, n)
        bufs[n].update(act)
        tops[n].update(act, batch["index"])

    for _ in stream_dataset(model, ds, names, config.batch_size, config.workers, start, "dissect 1/2 thresholds",
                            show, reduce=on_layer):
        batches += 1
        if store and batches % config.checkpoint_every == 0:
            store.save("pass1", snapshot(False))
    if not bufs or any(b.empty for b in bufs.values()):
        raise DataError(f"{ds.root} yielded no images; check the dataset (and its split)")
    final = snapshot(True)
    if store:
        store.save("pass1", final)
    return dict(final["thresholds"]), {n: t.result() for n, t in tops.items()}


def unit_thresholds(model: nn.Module, dataset: BrodenDataset | str | os.PathLike[str], layers: str | Sequence[str],
                    config: DissectConfig = DissectConfig(), progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Pass 1 alone: every unit's exact ``T_f`` with ``P(a_f > T_f) = config.quantile`` (Bau et al. 2017, Eq. 18),
    equal to ``numpy.quantile(a_f, 1 - quantile)`` over all positions of all images (linear interpolation)."""
    ds = open_dataset(dataset, model, config)
    names = list(resolve_layers(model, layers))
    return _pass_thresholds(model, ds, names, config, None, progress)[0]


def dissect(model: nn.Module, dataset: BrodenDataset | str | os.PathLike[str], layers: str | Sequence[str],
            config: DissectConfig = DissectConfig(), out: str | os.PathLike[str] | None = None,
            progress: bool | None = None) -> dict[str, LayerDissection]:
    """Network Dissection (Bau et al. 2017; survey Sec. 6.2.1, Eq. 18-19) of every unit of ``layers`` at once.

    Args:
        model: any ``nn.Module`` (left untouched: hooks through :func:`~convscope.core.probe.probe`).
        dataset: a :class:`~convscope.data.broden.BrodenDataset` (e.g. the synthetic one written by
            :func:`convscope.data.synthetic.generate`, or a real Broden download) or its folder.  Images in
            ``[0, 1]`` go through ``model.preprocess.normalize`` when the model has one.
        layers: names from ``model.named_modules()`` (a list or comma-separated string).
        config: :class:`DissectConfig` (``quantile=0.005``, ``iou_threshold=0.04``, ...).
        out: a folder for resumable state (thresholds and partial counts, saved atomically); a rerun continues.
        progress: progress bars with an ETA: ``True``, ``False``, or ``None`` (default: each pass's bar once it
            has run 2 s).

    Returns ``{layer: LayerDissection}`` with one row per unit (unit, label, category, iou, threshold) and the
    full IoU matrix units x concepts.
    """
    if not isinstance(config, DissectConfig):
        raise ConvscopeError(f"dissect(config=...) takes a DissectConfig, got {type(config).__name__}")
    ds = open_dataset(dataset, model, config)
    names = list(resolve_layers(model, layers))
    space = concept_space(ds, config.categories)
    store = None
    if out is not None:
        meta = {"format": 2, "config": config.fingerprint(), "layers": names, "model": model_hash(model),
                "dataset": {"root": str(Path(ds.root).resolve()), "images": len(ds), "split": ds.split,
                            "size": list(ds.size) if ds.size else None,
                            "seg_size": list(ds.seg_size) if ds.seg_size else None}}
        store = _Store(out, meta)
    thresholds, tops = _pass_thresholds(model, ds, names, config, store, progress)

    state = store.load("pass2") if store else None
    start = int(state["batches"]) if state else 0
    c = len(space)
    inter = dict(state["inter"]) if state else {}
    activated = dict(state["activated"]) if state else {}
    truth = state["truth"] if state else torch.zeros(c, dtype=torch.float64)
    seg_size = tuple(state["seg_size"]) if state and state.get("seg_size") else None
    batches = start

    def snapshot(done: bool) -> dict[str, Any]:
        return {"batches": batches, "done": done, "inter": inter, "activated": activated, "truth": truth,
                "seg_size": list(seg_size) if seg_size else None}

    if not (state and state.get("done")):
        size = ds.seg_size
        current: dict[str, Any] = {}

        def labels_of(batch: Mapping[str, Any]) -> BatchLabels:
            if current.get("batch") is not batch:
                current["batch"], current["labels"] = batch, batch_labels(batch, space, size)
            return current["labels"]

        def on_layer(batch: Mapping[str, Any], n: str, act: torch.Tensor) -> None:
            i, a, _ = tally_batch(act, thresholds[n], labels_of(batch))
            inter[n] = inter[n] + i if n in inter else i
            activated[n] = activated[n] + a if n in activated else a

        for batch, _ in stream_dataset(model, ds, names, config.batch_size, config.workers, start,
                                       "dissect 2/2 IoU", progress, reduce=on_layer):
            labels = labels_of(batch)
            seg_size = labels.size
            truth = truth + labels.truth
            batches += 1
            if store and batches % config.checkpoint_every == 0:
                store.save("pass2", snapshot(False))
        if store:
            store.save("pass2", snapshot(True))
    return {n: _layer_result(n, space, thresholds[n], inter[n], activated[n], truth, tops[n], config,
                             seg_size or (0, 0)) for n in names}


# --------------------------------------------------------------------------- comparing conditions


@dataclass(frozen=True)
class Comparison:
    """Detectors per category side by side (survey Sec. 6.3.2): ``rows`` one dict per (condition, layer) with
    ``condition``, ``layer``, per category the unique detectors, ``total`` unique detectors, ``detector_units`` and
    ``units``."""

    conditions: list[str]
    layers: list[str]
    categories: list[str]
    rows: list[dict[str, Any]]

    def text(self) -> str:
        """A plain-text table."""
        head = ["condition", "layer", *self.categories, "total", "detector_units", "units"]
        lines = [head] + [[str(r[h]) for h in head] for r in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in lines)


def compare(results_by_name: Mapping[str, Mapping[str, LayerDissection]]) -> Comparison:
    """Unique detectors per category for several conditions (e.g. checkpoints, training regimes) side by side.

    ``results_by_name`` maps a condition name to a :func:`dissect` result; rows follow the given order.
    """
    if not results_by_name:
        raise ConvscopeError("compare() got no results; pass {name: dissect(...)} for at least one condition")
    cats: list[str] = []
    layers: list[str] = []
    rows = []
    for name, res in results_by_name.items():
        for layer, d in res.items():
            if not isinstance(d, LayerDissection):
                raise ConvscopeError(f"compare(): {name!r} / {layer!r} is a {type(d).__name__}, not a LayerDissection;"
                                     " pass the dicts dissect() returns")
            cats += [c for c in d.categories if c not in cats]
            layers += [layer] if layer not in layers else []
    for name, res in results_by_name.items():
        for layer, d in res.items():
            s = d.summary()
            row: dict[str, Any] = {"condition": name, "layer": layer}
            row.update({c: s.get(c, 0) for c in cats})
            row.update(total=sum(s.values()), detector_units=len(d.detectors()), units=len(d.rows))
            rows.append(row)
    return Comparison(list(results_by_name), layers, cats, rows)
