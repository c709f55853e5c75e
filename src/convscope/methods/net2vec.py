"""Net2Vec: concepts as weighted combinations of a layer's units.

Fong & Vedaldi, "Net2Vec: Quantifying and Explaining how Concepts are Encoded by Filters in Deep Neural
Networks", CVPR 2018; the survey's Eq. 20-21.  Network Dissection (:mod:`convscope.methods.dissect`) asks how well
*one* unit segments a concept; Net2Vec learns, for every concept ``c``, weights ``w_c`` over all ``K`` units of a
layer and a bias, and segments with

    M_c(x) = sigmoid(sum_k w_ck I_k(x) + b_c)                                          (Eq. 20)

where ``I_k`` is unit k's map upsampled bilinearly to the label resolution and binarized with its NetDissect
threshold, ``1[A_k > T_k]`` (``P(A_k > T_k) = quantile``; our reading of the paper's segmentation experiments;
``inputs="raw"`` uses ``A_k / T_k`` instead).  The weights minimize the per-pixel binary cross-entropy, balanced by
``alpha_c = 1 - (fraction of the concept's annotated training pixels that are positive)``:

    L_c = -mean_x [ alpha_c L_c(x) log M_c(x) + (1 - alpha_c) (1 - L_c(x)) log(1 - M_c(x)) ]     (Eq. 21)

with SGD and momentum.  All concepts train at once as one batched linear map ``C x K`` (a ``1 x 1`` convolution),
each concept's loss averaged over the pixels of images annotated for its category (as in dissection), then summed.

Decision: the paper thresholds ``M_c > 0.5`` (``decision="paper"``).  Under the balanced loss that threshold sits
where ``P(L_c = 1 | x)`` equals the concept's base rate, not where IoU is best: for a concept the features barely
predict (colours at demo_net's relu5) the mask spreads over half the image or more and its IoU lands on the
trivial mask's.  The default ``decision="iou"`` keeps the learned ranking ``w . I(x) + b`` and picks, per concept,
the logit threshold ``tau_c`` that maximizes the set IoU on the *training* images (a 1024-bin histogram of their
logits); held-out images never choose anything.

Evaluation on held-out images (the dataset's ``val`` split, else the last ``val_fraction`` of the images): the set
IoU of ``w . I(x) + b > tau_c`` with the concept (``IoU_com``, sums over all held-out images annotated for the
category), beside the two trivial baselines on the same images: the best single unit (NetDissect's ``IoU_{f,c}``,
computed by :func:`~convscope.methods.dissect.tally_batch`; chosen on the held-out images, which favours it) and
the mask of every annotated pixel (``iou_all``, the concept's share of them).  ``gain`` is ``IoU_com`` minus the
better baseline, with a bootstrap interval over held-out images (``bootstrap`` resamples, ``confidence``);
``beats_baselines`` is true when the interval's lower end exceeds ``margin``.  ``units_needed``: the smallest
``k`` such that keeping only the ``k`` weights of largest ``|w_ck|`` (the others set to 0, no retraining, same
bias and ``tau_c``) reaches ``coverage`` (90 %) of ``IoU_com``; ``0`` if the trained combination is not positive.

Memory: the layer's activations of every image are cached (``images x units x h x w`` float32) with the label maps
(``images x layers x H x W`` int32); ``max_cache_mb`` bounds it, with an error naming the fix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layers import resolve_layers
from ..core.progress import progress_bar
from ..core.stats import bootstrap_weights
from ..data.broden import BrodenDataset
from ..errors import ConvscopeError, DataError
from .dissect import (
    BatchLabels,
    DissectConfig,
    TopBuffer,
    batch_labels,
    concept_space,
    float32_below,
    iou_from_counts,
    open_dataset,
    stream_dataset,
    tally_batch,
)

__all__ = ["ConceptVector", "Net2VecConfig", "Net2VecResult", "net2vec"]


@dataclass(frozen=True)
class Net2VecConfig:
    """Settings of :func:`net2vec`.

    Attributes:
        quantile: the NetDissect quantile of the unit thresholds ``T_k`` (binarization, single-unit baseline).
        inputs: ``"binary"`` (``1[A_k > T_k]``) or ``"raw"`` (``A_k / T_k``).
        epochs, lr, momentum, batch_size: SGD over the cached training images.
        val_split: the held-out split; without such rows, the last ``val_fraction`` of the images.
        coverage: ``units_needed`` reaches this fraction of ``IoU_com``.
        balance: weight the loss by ``alpha_c`` (Eq. 21); False: plain per-pixel cross-entropy.
        decision: ``"iou"`` (threshold of best training IoU) or ``"paper"`` (``M_c > 0.5``).
        bootstrap, confidence: resamples of the held-out images and level of the ``gain`` interval;
        margin: ``beats_baselines`` needs the interval's lower end above it (IoU, default 0.01).
        categories: concept categories (None: all); ``seg_size``: label resolution (None: the dataset's).
        seed: shuffling of the training images.
        workers: DataLoader workers; max_cache_mb: cap on the cached activations and labels.
    """

    quantile: float = 0.005
    inputs: str = "binary"
    epochs: int = 30
    lr: float = 0.5
    momentum: float = 0.9
    batch_size: int = 16
    val_split: str = "val"
    val_fraction: float = 0.2
    coverage: float = 0.9
    balance: bool = True
    decision: str = "iou"
    bootstrap: int = 1000
    confidence: float = 0.95
    margin: float = 0.01
    categories: tuple[str, ...] | None = None
    seg_size: int | tuple[int, int] | None = None
    seed: int = 0
    workers: int = 1
    max_cache_mb: float = 2048.0

    def __post_init__(self) -> None:
        if self.inputs not in ("binary", "raw"):
            raise ConvscopeError(f"Net2VecConfig(inputs={self.inputs!r}): use 'binary' or 'raw'")
        if self.decision not in ("iou", "paper"):
            raise ConvscopeError(f"Net2VecConfig(decision={self.decision!r}): use 'iou' (threshold of best training "
                                 "IoU) or 'paper' (M > 0.5)")
        if isinstance(self.bootstrap, bool) or not isinstance(self.bootstrap, int) or self.bootstrap < 0:
            raise ConvscopeError(f"Net2VecConfig(bootstrap={self.bootstrap!r}): use an int >= 0 (0: no interval)")
        if not (0 < self.confidence < 1 and -1 < self.margin < 1):
            raise ConvscopeError(f"Net2VecConfig: need 0 < confidence < 1 and -1 < margin < 1 (got "
                                 f"{self.confidence}, {self.margin})")
        if not 0.0 < float(self.quantile) < 1.0:
            raise ConvscopeError(f"Net2VecConfig(quantile={self.quantile!r}): use a fraction in (0, 1)")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConvscopeError(f"Net2VecConfig({name}={v!r}): use a positive int")
        if not (self.lr > 0 and 0 <= self.momentum < 1 and 0 < self.val_fraction < 1 and 0 < self.coverage <= 1):
            raise ConvscopeError("Net2VecConfig: need lr > 0, 0 <= momentum < 1, 0 < val_fraction < 1 and "
                                 f"0 < coverage <= 1 (got {self.lr}, {self.momentum}, {self.val_fraction}, "
                                 f"{self.coverage})")
        if self.categories is not None:
            object.__setattr__(self, "categories", tuple(self.categories))


@dataclass(frozen=True)
class ConceptVector:
    """One concept's Net2Vec result: held-out ``iou_com`` of the learned combination, the best single unit and its
    held-out IoU, ``units_needed`` (see the module doc), and ``iou_all``: the held-out IoU of the trivial mask that
    marks every annotated pixel (the concept's share of them).  ``gain``: ``iou_com`` minus the better of the two
    baselines, ``gain_low`` / ``gain_high`` its bootstrap interval over held-out images; ``beats_baselines``:
    ``gain_low > margin``.  ``threshold``: the logit ``tau_c`` of the decision; ``positive_fraction``: the share of
    the held-out annotated pixels the combination marks (near 1: it has learned "everything")."""

    concept: str
    category: str
    iou_com: float
    best_unit: int
    best_unit_iou: float
    units_needed: int
    iou_all: float = 0.0
    gain: float = 0.0
    gain_low: float = 0.0
    gain_high: float = 0.0
    beats_baselines: bool = False
    margin: float = 0.0
    threshold: float = 0.0
    positive_fraction: float = 0.0


@dataclass(frozen=True)
class Net2VecResult:
    """Net2Vec of one layer: ``weights`` ``C x K`` (the concept embeddings) and ``bias`` ``C``, per-concept
    ``iou_com``, ``single_iou`` ``K x C`` (each unit's held-out IoU), ``iou_by_units`` ``C x K`` (IoU keeping the
    top-k weights, k = 1..K), ``rows`` one :class:`ConceptVector` per concept, ``loss`` per epoch, ``decision``
    ``C``: the logit thresholds ``tau_c`` (a pixel is marked where ``w_c . I(x) + b_c > tau_c``)."""

    layer: str
    concepts: list[str]
    categories: list[str]
    weights: torch.Tensor
    bias: torch.Tensor
    iou_com: torch.Tensor
    single_iou: torch.Tensor
    iou_by_units: torch.Tensor
    thresholds: torch.Tensor
    rows: list[ConceptVector]
    loss: list[float] = field(default_factory=list)
    train_images: int = 0
    val_images: int = 0
    decision: torch.Tensor | None = None

    def row(self, concept: str) -> ConceptVector:
        """The row of ``concept`` (by name)."""
        for r in self.rows:
            if r.concept == concept:
                return r
        raise ConvscopeError(f"no concept {concept!r} in this Net2Vec result; it has {', '.join(self.concepts)}")


@dataclass
class _Cache:
    acts: torch.Tensor  # N x K x h x w
    cols: torch.Tensor  # N x L x P (concept column, C = none)
    image_level: torch.Tensor  # N x C
    annotated: torch.Tensor  # N x C
    val: torch.Tensor  # N bool
    size: tuple[int, int]

    def labels(self, idx: torch.Tensor) -> BatchLabels:
        cols = self.cols[idx].long()
        il = self.image_level[idx]
        c = il.shape[1]
        truth = torch.bincount(cols.flatten(), minlength=c + 1)[:c].double() + self.size[0] * self.size[1] * il.sum(0)
        return BatchLabels(cols, il, self.annotated[idx], truth, self.size)


def _cache(model: nn.Module, ds: BrodenDataset, layer: str, space: Any, config: Net2VecConfig,
           show: bool | None) -> _Cache:
    acts, cols, il, ann, val = [], [], [], [], []
    mb = 0.0
    size = ds.seg_size
    label_size = (0, 0)  # the label resolution of the batches (set by the first)
    for batch, out in stream_dataset(model, ds, [layer], config.batch_size, config.workers, 0, "net2vec features",
                                     show):
        a = out[layer]
        a = (a[:, :, None, None] if a.dim() == 2 else a).float().cpu()
        lab = batch_labels(batch, space, size)
        size = label_size = lab.size
        acts.append(a)
        cols.append(lab.cols.to(torch.int32))
        il.append(lab.image_level)
        ann.append(lab.annotated)
        val.append(torch.tensor([s == config.val_split for s in batch["split"]]))
        mb += (a.numel() * 4 + lab.cols.numel() * 4) / 2**20
        if mb > config.max_cache_mb:
            raise ConvscopeError(f"net2vec: caching {layer!r} activations and labels needs over {mb:.0f} MiB; raise "
                                 "Net2VecConfig(max_cache_mb=...), use fewer images or a smaller seg_size")
    if not acts:
        raise DataError(f"{ds.root} yielded no images; check the dataset (and its split)")
    depth = max(c.shape[1] for c in cols)
    c = il[0].shape[1]
    cols = [F.pad(x, (0, 0, 0, depth - x.shape[1]), value=c) for x in cols]
    v = torch.cat(val)
    if not v.any() or v.all():  # no usable split column: hold out the last val_fraction
        n = len(v)
        v = torch.arange(n) >= n - max(1, round(config.val_fraction * n))
    if v.all() or not v.any():
        raise DataError("net2vec needs at least 2 images (some to train on, some held out)")
    return _Cache(torch.cat(acts), torch.cat(cols), torch.cat(il), torch.cat(ann), v, label_size)


def _features(acts: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int], inputs: str) -> torch.Tensor:
    """``B x K x P`` inputs of Eq. 20: binarized (or threshold-scaled) upsampled unit maps."""
    up = F.interpolate(acts, size=size, mode="bilinear", align_corners=False) if acts.shape[-2:] != size else acts
    t = float32_below(thresholds).float()
    if inputs == "binary":
        return (up > t[None, :, None, None]).float().flatten(2)
    return (up / t.clamp(min=1e-6)[None, :, None, None]).flatten(2)


def _targets(lab: BatchLabels, c: int) -> torch.Tensor:
    """``B x C x P`` binary concept masks."""
    b, _, p = lab.cols.shape
    y = torch.zeros(b, c + 1, p)
    if lab.cols.shape[1]:
        y.scatter_(1, lab.cols, 1.0)
    return torch.maximum(y[:, :c], lab.image_level.float()[:, :, None].clamp(max=1))


def net2vec(model: nn.Module, dataset: BrodenDataset | str | os.PathLike[str], layer: str,
            concepts: Sequence[str] | None = None, config: Net2VecConfig = Net2VecConfig(),
            thresholds: torch.Tensor | None = None, progress: bool | None = None) -> Net2VecResult:
    """Net2Vec (Fong & Vedaldi 2018; survey Eq. 20-21): learn a weighted combination of ``layer``'s units per
    concept, and compare its held-out set IoU with the best single unit's.

    Args:
        model: any ``nn.Module`` (untouched: activations are read through the probe, the weights are separate).
        dataset: a :class:`~convscope.data.broden.BrodenDataset` or its folder (see :func:`dissect`).
        layer: one layer name.
        concepts: concept names to learn (default: every concept with positive pixels in both the training and
            the held-out images).
        config: :class:`Net2VecConfig`.
        thresholds: the units' ``T_k`` (e.g. from :func:`~convscope.methods.dissect.dissect`); default: computed
            exactly on the training images with ``config.quantile``.
    """
    if not isinstance(config, Net2VecConfig):
        raise ConvscopeError(f"net2vec(config=...) takes a Net2VecConfig, got {type(config).__name__}")
    names = list(resolve_layers(model, layer))
    if len(names) != 1:
        raise ConvscopeError(f"net2vec(layer={layer!r}) takes one layer; call it once per layer")
    layer = names[0]
    dcfg = DissectConfig(quantile=config.quantile, seg_size=config.seg_size, categories=config.categories,
                         batch_size=config.batch_size, workers=config.workers)
    ds = open_dataset(dataset, model, dcfg)
    space = concept_space(ds, config.categories)
    cache = _cache(model, ds, layer, space, config, progress)
    n, k = cache.acts.shape[:2]
    train_idx, val_idx = (~cache.val).nonzero().flatten(), cache.val.nonzero().flatten()

    if thresholds is None:
        buf = TopBuffer(len(train_idx) * cache.acts.shape[2] * cache.acts.shape[3], config.quantile, k,
                         float("inf"), layer)
        for s in range(0, len(train_idx), 256):
            buf.update(cache.acts[train_idx[s:s + 256]])
        thresholds = buf.thresholds()
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64).cpu()
    if thresholds.shape != (k,):
        raise ConvscopeError(f"net2vec(thresholds=...) needs {k} values (one per unit of {layer!r}), got shape "
                             f"{tuple(thresholds.shape)}")

    # concepts: positive pixels among the annotated training and held-out images
    c_all = len(space)
    pos = torch.zeros(2, c_all, dtype=torch.float64)
    tot = torch.zeros(2, c_all, dtype=torch.float64)
    p = cache.size[0] * cache.size[1]
    for j, idx in enumerate((train_idx, val_idx)):
        for s in range(0, len(idx), 64):
            lab = cache.labels(idx[s:s + 64])
            pos[j] += (_targets(lab, c_all) * lab.annotated[:, :, None]).sum((0, 2)).double()
            tot[j] += lab.annotated.double().sum(0) * p
    if concepts is None:
        chosen = ((pos[0] > 0) & (pos[1] > 0)).nonzero().flatten().tolist()
    else:
        chosen = []
        for name in concepts:
            if name not in space.names:
                raise ConvscopeError(f"net2vec: no concept {name!r} in {ds.root}; it has {', '.join(space.names)}")
            chosen.append(space.names.index(name))
    if not chosen:
        raise DataError("net2vec: no concept has positive pixels in both the training and the held-out images; "
                        "use more images")
    sel = torch.tensor(chosen)
    c = len(chosen)
    alpha = (1.0 - pos[0, sel] / tot[0, sel].clamp(min=1)).float() if config.balance else torch.full((c,), 0.5)

    def logits_of(idx: torch.Tensor, w: torch.Tensor, b: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, BatchLabels]:
        """``w . I(x) + b`` (``B x C x P``, Eq. 20 before the sigmoid), the concept masks and annotation flags."""
        lab = cache.labels(idx)
        x = _features(cache.acts[idx], thresholds, cache.size, config.inputs)  # B x K x P
        logits = torch.einsum("bkp,ck->bcp", x, w) + b[None, :, None]
        return logits, _targets(lab, c_all)[:, sel], lab.annotated[:, sel], lab

    # training: one batched linear map C x K, SGD with momentum (Eq. 21)
    w = torch.zeros(c, k, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    vel = [torch.zeros_like(w), torch.zeros_like(b)]  # SGD with momentum (torch.optim.SGD's update, no dampening)
    gen = torch.Generator().manual_seed(config.seed)
    losses = []
    with torch.enable_grad():
        for _ in progress_bar(range(config.epochs), desc="net2vec train", unit="epoch", progress=progress):
            order = train_idx[torch.randperm(len(train_idx), generator=gen)]
            total = 0.0
            for s in range(0, len(order), config.batch_size):
                idx = order[s:s + config.batch_size]
                logits, y, ann, _ = logits_of(idx, w, b)
                ann = ann.float()
                weight = ann[:, :, None] * (alpha[None, :, None] * y + (1 - alpha[None, :, None]) * (1 - y))
                per = F.binary_cross_entropy_with_logits(logits, y, weight=weight, reduction="none")
                loss = (per.sum((0, 2)) / (ann.sum(0) * p).clamp(min=1)).sum()
                gw, gb = torch.autograd.grad(loss, [w, b])
                with torch.no_grad():
                    for param, v, g in ((w, vel[0], gw), (b, vel[1], gb)):
                        v.mul_(config.momentum).add_(g)
                        param.sub_(config.lr * v)
                total += float(loss.detach()) * len(idx)
            losses.append(total / len(train_idx))
    w, b = w.detach(), b.detach()
    tau = (torch.zeros(c) if config.decision == "paper"
           else _iou_thresholds(lambda idx: logits_of(idx, w, b)[:3], train_idx, c, config.batch_size))

    # held-out evaluation: combination, single units (NetDissect IoU), top-k truncations, per-image counts
    order_w = w.abs().argsort(1, descending=True)  # C x K
    inter_k = torch.zeros(c, k, dtype=torch.float64)
    union_k = torch.zeros(c, k, dtype=torch.float64)
    s_inter = torch.zeros(k, c_all, dtype=torch.float64)
    s_act = torch.zeros(k, c_all, dtype=torch.float64)
    s_truth = torch.zeros(c_all, dtype=torch.float64)
    nv = len(val_idx)
    counts = torch.zeros(3, 2, nv, c, dtype=torch.float64)  # (combination, best unit, all pixels) x (I, U) x image
    marked = torch.zeros(c, dtype=torch.float64)
    chunk = max(1, int(2**26 // max(1, k * p)))  # concepts per step: about 256 MiB of cumulative sums
    for s in range(0, nv, config.batch_size):
        idx = val_idx[s:s + config.batch_size]
        logits, y, ann, lab = logits_of(idx, w, b)
        i1, a1, _ = tally_batch(cache.acts[idx], thresholds, lab)
        s_inter += i1
        s_act += a1
        s_truth += lab.truth
        x = _features(cache.acts[idx], thresholds, cache.size, config.inputs)
        y = y.bool()
        m = ann.double()
        pred = logits > tau[None, :, None]
        counts[0, 0, s:s + len(idx)] = (pred & y).sum(2).double() * m
        counts[0, 1, s:s + len(idx)] = (pred | y).sum(2).double() * m
        counts[2, 0, s:s + len(idx)] = y.sum(2).double() * m
        counts[2, 1, s:s + len(idx)] = p * m
        marked += (pred.sum(2).double() * m).sum(0)
        for img in range(len(idx)):  # one image at a time bounds memory: C x K x P partial sums
            for c0 in range(0, c, chunk):
                cs = slice(c0, c0 + chunk)
                wo = w[cs].gather(1, order_w[cs])  # c' x K, weights by decreasing |w|
                xo = x[img][order_w[cs]]  # c' x K x P, the units in that order
                pk = (torch.cumsum(wo[:, :, None] * xo, 1) + b[cs, None, None]) > tau[cs, None, None]  # c' x K x P
                yy = y[img, cs][:, None, :]
                inter_k[cs] += (pk & yy).sum(2).double() * m[img, cs, None]
                union_k[cs] += (pk | yy).sum(2).double() * m[img, cs, None]
    iou_k = torch.where(union_k > 0, inter_k / union_k.clamp(min=1), torch.zeros_like(inter_k))
    iou_com = iou_k[:, -1].clone()
    single = iou_from_counts(s_inter, s_act, s_truth)[:, sel]  # K x C
    best_iou, best_unit = single.max(0)
    for s in range(0, nv, config.batch_size):  # the best unit's per-image counts, for the interval
        idx = val_idx[s:s + config.batch_size]
        lab = cache.labels(idx)
        on = _features(cache.acts[idx], thresholds, cache.size, "binary")[:, best_unit].bool()  # B x C x P
        y = _targets(lab, c_all)[:, sel].bool()
        m = lab.annotated[:, sel].double()
        counts[1, 0, s:s + len(idx)] = (on & y).sum(2).double() * m
        counts[1, 1, s:s + len(idx)] = (on | y).sum(2).double() * m
    iou_all = pos[1, sel] / tot[1, sel].clamp(min=1)
    gain = iou_com - torch.maximum(best_iou, iou_all)
    low, high = _gain_interval(counts, config, gain)
    rows = []
    for j, col in enumerate(chosen):
        reach = (iou_k[j] >= config.coverage * iou_com[j]).nonzero().flatten()
        need = int(reach[0]) + 1 if iou_com[j] > 0 and len(reach) else 0
        rows.append(ConceptVector(space.names[col], space.category[col], float(iou_com[j]), int(best_unit[j]),
                                  float(best_iou[j]), need, float(iou_all[j]), float(gain[j]), float(low[j]),
                                  float(high[j]), bool(low[j] > config.margin), config.margin, float(tau[j]),
                                  float(marked[j] / tot[1, col].clamp(min=1))))
    return Net2VecResult(layer, [space.names[i] for i in chosen], [space.category[i] for i in chosen], w, b,
                         iou_com, single, iou_k, thresholds, rows, losses, len(train_idx), len(val_idx), tau)


def _iou_thresholds(logits_of: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                    idx: torch.Tensor, c: int, batch_size: int, bins: int = 1024) -> torch.Tensor:
    """Per concept, the logit threshold ``tau`` whose mask ``logit > tau`` has the largest set IoU on the images
    ``idx`` (two passes: the logits' range, then 1024-bin histograms of the positive and negative pixels); the
    lowest candidate marks every pixel, so the trivial mask is among the choices."""
    lo = torch.full((c,), math.inf, dtype=torch.float64)
    hi = torch.full((c,), -math.inf, dtype=torch.float64)
    for s in range(0, len(idx), batch_size):
        logits, _, ann = logits_of(idx[s:s + batch_size])
        lo = torch.minimum(lo, logits.double().masked_fill(~ann[:, :, None], math.inf).amin((0, 2)))
        hi = torch.maximum(hi, logits.double().masked_fill(~ann[:, :, None], -math.inf).amax((0, 2)))
    lo, hi = torch.where(torch.isfinite(lo), lo, 0.0), torch.where(torch.isfinite(hi), hi, 0.0)
    span = (hi - lo).clamp(min=1e-6)
    edges = (lo[:, None] + span[:, None] * torch.arange(bins + 1, dtype=torch.float64) / bins).float()
    edges[:, 0] = torch.nextafter((lo - 1e-3 * span).float(), torch.tensor(-math.inf))  # below every logit
    hist = torch.zeros(2, c, bins + 2, dtype=torch.float64)  # (positive, negative) x concept x bucket
    for s in range(0, len(idx), batch_size):
        logits, y, ann = logits_of(idx[s:s + batch_size])
        for j in range(c):
            keep = ann[:, j, None].expand_as(y[:, j])
            bucket = torch.bucketize(logits[:, j][keep], edges[j])  # edges[i-1] < logit <= edges[i]
            pos = y[:, j][keep] > 0
            hist[0, j] += torch.bincount(bucket[pos], minlength=bins + 2).double()
            hist[1, j] += torch.bincount(bucket[~pos], minlength=bins + 2).double()
    above = hist.flip(2).cumsum(2).flip(2)[:, :, 1:]  # [., ., t]: pixels with logit > edges[t]
    truth = hist[0].sum(1, keepdim=True)
    inter, marked = above[0], above[0] + above[1]
    iou = torch.where(truth + marked - inter > 0, inter / (truth + marked - inter).clamp(min=1), 0.0)
    return edges.gather(1, iou.argmax(1, keepdim=True))[:, 0]


def _gain_interval(counts: torch.Tensor, config: Net2VecConfig, gain: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bootstrap interval (images resampled with replacement, ``config.bootstrap`` times, seeded) of the gain of the
    combination over the better baseline, from per-image intersections and unions ``3 x 2 x N x C``; without
    resamples, the point estimate at both ends."""
    n = counts.shape[2]
    if config.bootstrap == 0 or n == 0:
        return gain.clone(), gain.clone()
    weight = bootstrap_weights(n, config.bootstrap, config.seed)
    sums = torch.einsum("rn,abnc->abrc", weight, counts)  # 3 x 2 x R x C
    iou = torch.where(sums[:, 1] > 0, sums[:, 0] / sums[:, 1].clamp(min=1e-12), 0.0)  # 3 x R x C
    g = iou[0] - torch.maximum(iou[1], iou[2])
    a = (1 - config.confidence) / 2
    return torch.quantile(g, a, dim=0), torch.quantile(g, 1 - a, dim=0)
