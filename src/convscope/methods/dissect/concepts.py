"""The concept space of a Broden-style dataset and the per-batch label tensors the tally reads."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...data.broden import BrodenDataset
from ...errors import DataError

# --------------------------------------------------------------------------- concepts


def bilinear_axis(src: int, dst: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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
        the combination ids of each cell's output block (see :func:`bilinear_axis`; pads repeat a pixel of the
        block); ``uniform`` (``N x h x w``) is the block's one id, or -1 where labels change inside it."""
        if (h, w) not in self._blocks:
            combo = self.combos[0].view(-1, *self.size)
            rows, _, _, _ = bilinear_axis(h, self.size[0])
            cols, _, _, _ = bilinear_axis(w, self.size[1])
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
        size = tuple(segs[0].shape[-2:])
    h, w = size
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
