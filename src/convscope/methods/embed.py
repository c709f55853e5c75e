"""Feature embeddings: where a layer puts each image of a dataset, in two dimensions.

:func:`embed` streams a dataset through the model once (:func:`~convscope.core.probe.probe`, no gradients, one
batch at a time), keeps each image's global-average-pooled activation of one layer (``f_c = mean_{y,x} A_c(y,
x)``, the descriptor Krizhevsky et al. 2012 and Donahue et al. 2014 (DeCAF) compare images by) and projects the
``N x C`` descriptors to 2-D with

* ``"tsne"``: t-SNE (van der Maaten & Hinton 2008), scikit-learn's Barnes-Hut implementation, after a PCA to
  ``pca_dims`` dimensions (their Sec. 5 recommendation for high-dimensional data), PCA initialization, fixed seed;
* ``"pca"``: the first two principal components, ``X_c V_{:, :2}`` with ``X_c = U S V^T`` the centred features;
* ``"umap"``: UMAP (McInnes et al. 2018) from the optional ``umap-learn`` package.

Images that the layer finds alike land close together: clusters show which distinctions the layer has learnt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.layers import resolve_layer
from ..core.model import input_denormalizer, model_device
from ..core.probe import probe
from ..core.progress import progress_bar
from ..core.stream import Images, check_ran, image_batches
from ..errors import ConvscopeError

__all__ = ["EMBED_METHODS", "Embedding", "PooledFeatures", "embed", "pooled_features", "project"]

EMBED_METHODS = ("tsne", "umap", "pca")


@dataclass(frozen=True)
class PooledFeatures:
    """What one pass over the dataset gives: ``features`` ``N x C`` (float32, CPU), the image ``ids`` ``N``,
    the model's top class per image (``predictions``, or None) and small RGB ``thumbnails`` (uint8
    ``N x 3 x t x t``, or None)."""

    features: torch.Tensor
    ids: torch.Tensor
    predictions: torch.Tensor | None
    thumbnails: torch.Tensor | None


@dataclass(frozen=True)
class Embedding:
    """2-D positions of the images of a dataset from the pooled features of ``layer``.

    ``coords``: ``N x 2`` (float64); ``features``: ``N x C`` pooled features; ``labels``: the labels given (or
    None); ``predictions``: the model's top class per image (or None); ``thumbnails``: uint8 RGB ``N x 3 x t x t``
    (or None); ``ids``: each image's id in the stream.
    """

    coords: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor | None
    predictions: torch.Tensor | None
    thumbnails: torch.Tensor | None
    ids: torch.Tensor
    layer: str
    method: str
    seed: int

    @property
    def colours(self) -> torch.Tensor | None:
        """The class each point is coloured by: its label when given, else the model's prediction."""
        return self.labels if self.labels is not None else self.predictions


def _pool(name: str, a: torch.Tensor) -> torch.Tensor:
    """Global average pooling: ``N x C x H x W`` -> mean over H, W; ``N x L x C`` (tokens) -> mean over L;
    ``N x C`` as is."""
    if a.dim() == 4:
        return a.float().mean((2, 3))
    if a.dim() == 3:
        return a.float().mean(1)
    if a.dim() == 2:
        return a.float()
    raise ConvscopeError(f"layer {name!r} outputs {tuple(a.shape)}; pick a convolutional (N x C x H x W), token "
                         "(N x L x C) or linear (N x C) layer (`convscope layers MODEL` lists them)")


def pooled_features(model: nn.Module, layer: str, data: Images, batch_size: int = 32,
                    progress: bool | None = None, predict: bool = False, thumbnail: int = 0) -> PooledFeatures:
    """Global-average-pooled features of ``layer`` for every image of ``data`` (a tensor ``N x C x H x W`` in the
    model's input space, or an iterable of batches / ``(batch, ids)`` pairs), one forward pass per batch.

    ``predict``: also run the model to its output for each image's top class (otherwise the pass stops after
    ``layer``); ``thumbnail``: also keep each image as ``thumbnail`` px RGB (0: none).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConvscopeError(f"batch_size={batch_size!r}: use a positive int")
    if isinstance(thumbnail, bool) or not isinstance(thumbnail, int) or thumbnail < 0:
        raise ConvscopeError(f"thumbnail={thumbnail!r}: give a size in pixels (an int >= 0)")
    name = resolve_layer(model, layer)[0]
    device = model_device(model)
    denormalize = input_denormalizer(model)
    feats, ids, preds, thumbs = [], [], [], []
    total = math.ceil(len(data) / batch_size) if isinstance(data, torch.Tensor) else None
    with torch.no_grad(), probe(model, [name], detach=True, reduce=_pool, stop_after=None if predict else name) as p:
        for x, bid in progress_bar(image_batches(data, batch_size), total=total, desc="embed", unit="batch",
                                   progress=progress):
            p.clear()
            out = p.forward(model, x.to(device))
            check_ran([name], p.called)
            feats.append(p.activations[name].cpu())
            ids.append(bid)
            if predict:
                if not isinstance(out, torch.Tensor) or out.dim() != 2:
                    raise ConvscopeError("the model does not return N x classes logits, so there are no predicted "
                                         "classes to colour by; pass labels=")
                preds.append(out.argmax(1).cpu())
            if thumbnail:
                rgb = denormalize(x.float()).clamp(0, 1)
                small = F.interpolate(rgb, size=(thumbnail, thumbnail), mode="bilinear", antialias=True,
                                      align_corners=False)
                thumbs.append(small.mul(255).round().to(torch.uint8).cpu())
    if not feats:
        raise ConvscopeError("the dataset is empty; give at least one image")
    return PooledFeatures(torch.cat(feats), torch.cat(ids), torch.cat(preds) if predict else None,
                          torch.cat(thumbs) if thumbnail else None)


def _umap() -> Any:
    """The ``umap`` module of the optional umap-learn package, or a one-line error with the fix."""
    try:
        import umap
    except ImportError:
        raise ConvscopeError("method='umap' needs the optional package umap-learn: pip install umap-learn "
                             "(or use method='tsne' or 'pca')") from None
    return umap


def project(features: torch.Tensor | np.ndarray, method: str = "tsne", seed: int = 0, perplexity: float = 30.0,
            pca_dims: int = 50) -> np.ndarray:
    """``N x C`` features -> ``N x 2`` positions (float64) by t-SNE, PCA or UMAP (see the module docstring)."""
    if method not in EMBED_METHODS:
        raise ConvscopeError(f"method={method!r}: use one of {', '.join(EMBED_METHODS)}")
    x = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(
        features, dtype=np.float64)
    if x.ndim != 2:
        raise ConvscopeError(f"features must be N x C, got shape {x.shape}")
    n, c = x.shape
    if not np.isfinite(x).all():
        raise ConvscopeError("the features contain NaN or infinite values; check the model and the input images")
    need = 3 if method != "pca" else 2
    if n < need or c < 2:
        raise ConvscopeError(f"{n} image(s) with {c} feature(s): a 2-D {method} embedding needs at least {need} "
                             "images and a layer with 2 or more units")
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, svd_solver="full").fit_transform(x)
    if method == "umap":
        reducer = _umap().UMAP(n_components=2, random_state=seed, n_neighbors=max(2, min(15, n - 1)))
        return np.asarray(reducer.fit_transform(x), dtype=np.float64)
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if isinstance(pca_dims, int) and 2 <= pca_dims < min(n, c):
        x = PCA(n_components=pca_dims, svd_solver="full").fit_transform(x)
    perp = float(min(perplexity, (n - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perp, init="pca", learning_rate="auto", random_state=seed)
    return np.asarray(tsne.fit_transform(x), dtype=np.float64)


def embed(model: nn.Module, layer: str, data: Images, labels: Sequence[int] | torch.Tensor | np.ndarray | None = None,
          method: str = "tsne", seed: int = 0, batch_size: int = 32, progress: bool | None = None, *,
          perplexity: float = 30.0, pca_dims: int = 50, predict: bool | None = None,
          thumbnail: int = 0) -> Embedding:
    """Embed every image of ``data`` in 2-D by the global-average-pooled features of ``layer``.

    Args:
        data: a tensor ``N x C x H x W`` in the model's input space, or an iterable of batches (tensors or
            ``(tensor, ids)`` pairs), streamed one batch at a time.
        labels: one integer class per image (to colour by), or None.
        method: ``"tsne"`` (default), ``"umap"`` (needs ``pip install umap-learn``) or ``"pca"``.
        seed: the projection's random state (t-SNE and UMAP are deterministic given it).
        perplexity: t-SNE's perplexity (at most ``(N - 1) / 3``); pca_dims: PCA before t-SNE (0: none).
        predict: also record the model's top class per image (default: when no labels are given).
        thumbnail: keep each image as a ``thumbnail`` px RGB picture for reports (0: none).
        progress: a bar with an ETA (``True``, ``False``, ``None``: once the pass has run 2 s).
    """
    if method not in EMBED_METHODS:
        raise ConvscopeError(f"method={method!r}: use one of {', '.join(EMBED_METHODS)}")
    if method == "umap":
        _umap()  # before the pass: fail fast
    if labels is not None and isinstance(data, torch.Tensor) and len(labels) != len(data):
        raise ConvscopeError(f"labels: give {len(data)} integer classes, one per image; got {len(labels)}")
    pooled = pooled_features(model, layer, data, batch_size, progress, labels is None if predict is None else predict,
                             thumbnail)
    n = len(pooled.features)
    lab = None
    if labels is not None:
        lab = torch.as_tensor(np.asarray(labels))
        if lab.dim() != 1 or len(lab) != n or lab.is_floating_point() or lab.dtype == torch.bool:
            raise ConvscopeError(f"labels: give {n} integer classes, one per image; got {tuple(lab.shape)} "
                                 f"{lab.dtype}")
        lab = lab.long()
    coords = torch.from_numpy(project(pooled.features, method, seed, perplexity, pca_dims))
    return Embedding(coords, pooled.features, lab, pooled.predictions, pooled.thumbnails, pooled.ids,
                     resolve_layer(model, layer)[0], method, seed)
