"""Ground truth for scoring saliency and CAM maps against object masks.

* :func:`target_mask` — the pixels of an image's target object (from ``target.csv``, written
  by the synthetic generator: the dominant object, whose class is the scene label).
* :func:`pointing_game` — Zhang et al., "Top-down Neural Attention by Excitation Backprop"
  (ECCV 2016): a hit when the map's maximum lies on the object, within a tolerance (15 px).
* :func:`pointing_chance` — the pointing game's chance level: the hit rate of a uniformly random point.
* :func:`mask_iou` — IoU of the map's top region with the object mask, the localisation
  score of Network Dissection (Bau et al. 2017) and of Grad-CAM's box evaluation applied to masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from convscope.data.broden import TARGET_FILE, BrodenDataset
from convscope.errors import DataError

__all__ = ["mask_iou", "pixel_ranks", "pointing_chance", "pointing_game", "target_mask", "target_masks"]


def target_mask(dataset: BrodenDataset, index: int) -> np.ndarray:
    """Boolean h x w mask of image ``index``'s target object (at the dataset's seg size).

    The target is the ``(category, label)`` that ``target.csv`` names for the image; its mask is
    every pixel where any layer of that category holds that label.
    """
    target = dataset.target(index)
    if target is None:
        raise DataError(
            f"{dataset.root} has no {TARGET_FILE} entry for image {index}, so there is no target object; "
            f"write one with convscope.data.write_targets (columns image,category,label), "
            "or generate the dataset with `convscope data synth`"
        )
    category, label = target
    if category not in dataset.pixel_categories:
        raise DataError(
            f"{TARGET_FILE} names category {category!r}, which is not a loaded pixel-level category "
            f"({', '.join(dataset.pixel_categories)}); open the dataset with that category"
        )
    return (dataset.load_seg(index, category) == label).any(axis=0)


def target_masks(dataset: BrodenDataset, indices: Sequence[int]) -> torch.Tensor:
    """Target masks of several images stacked as a bool N x h x w tensor."""
    return torch.from_numpy(np.stack([target_mask(dataset, int(i)) for i in indices]))


def _prepare(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps as float N x H x W at the masks' size (bilinear if they differ), masks as bool."""
    maps = torch.as_tensor(maps)
    masks = torch.as_tensor(masks)
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim != 3:
        raise DataError(
            f"maps must be N x 1 x H x W (or N x H x W), got shape {tuple(maps.shape)}; reduce channels first"
        )
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3 or masks.shape[0] != maps.shape[0]:
        raise DataError(
            f"masks must be N x H x W with N = {maps.shape[0]} like the maps, got shape {tuple(masks.shape)}"
        )
    maps = maps.detach().to(torch.float32)
    if maps.shape[1:] != masks.shape[1:]:
        maps = F.interpolate(maps[:, None], size=tuple(masks.shape[1:]), mode="bilinear", align_corners=False)[:, 0]
    masks = masks.to(maps.device).bool()
    empty = (~masks.flatten(1).any(1)).nonzero().flatten().tolist()
    if empty:
        raise DataError(f"masks {empty[:10]} are empty: no object to point at; drop those images")
    return maps, masks


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, tolerance_px: float = 15) -> torch.Tensor:
    """Pointing-game hits (Zhang et al. 2016): bool N, True where the map's maximum lies within
    ``tolerance_px`` (Euclidean, in mask pixels) of the mask.

    ``maps`` is N x 1 x H x W (bilinearly resized to the masks' H x W if needed); ``masks`` is bool
    N x H x W.  Ties for the maximum go to the first pixel in raster order, so a flat map
    points at the top-left corner.
    """
    maps, masks = _prepare(maps, masks)
    n, h, w = maps.shape
    flat = maps.reshape(n, -1).argmax(dim=1)
    py, px = (flat // w).to(torch.float32), (flat % w).to(torch.float32)
    yy = torch.arange(h, device=maps.device, dtype=torch.float32).view(1, h, 1)
    xx = torch.arange(w, device=maps.device, dtype=torch.float32).view(1, 1, w)
    d2 = (yy - py.view(n, 1, 1)) ** 2 + (xx - px.view(n, 1, 1)) ** 2
    return (masks & (d2 <= float(tolerance_px) ** 2)).flatten(1).any(dim=1)


def pointing_chance(masks: torch.Tensor, tolerance_px: float = 15) -> torch.Tensor:
    """Chance level of :func:`pointing_game` (float N): the share of each image's pixels within ``tolerance_px``
    (Euclidean, the game's rule) of the mask, i.e. the hit probability of a map whose maximum falls on a uniformly
    random pixel. Its mean is what a method that ignores the image scores on average."""
    masks = torch.as_tensor(masks)
    masks = masks[:, 0] if masks.ndim == 4 and masks.shape[1] == 1 else masks
    _, masks = _prepare(torch.zeros(masks.shape, dtype=torch.float32), masks)
    r = int(float(tolerance_px))
    off = torch.arange(-r, r + 1, dtype=torch.float32)
    disc = (off[:, None] ** 2 + off[None, :] ** 2 <= float(tolerance_px) ** 2).float()[None, None]
    near = F.conv2d(masks[:, None].float(), disc, padding=r)[:, 0] > 0.5
    return near.flatten(1).float().mean(1)


def pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Rank of each pixel of each map (0 = highest value), ties in raster order (a stable sort): same shape as
    ``maps`` (``N x ...``), int64. Shared by mask IoU and the deletion / insertion curves."""
    n = maps.shape[0]
    flat = maps.reshape(n, -1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=maps.device).expand_as(order))
    return ranks.view(maps.shape)


def mask_iou(maps: torch.Tensor, masks: torch.Tensor, quantile: float | None = None) -> torch.Tensor:
    """IoU (float N) of each map's top region with its mask.

    The top region is the ``quantile`` fraction of pixels with the highest values (e.g. 0.2 keeps
    the top 20%, as NetDissect's ``quantile=0.005`` keeps the top 0.5%), exactly that many pixels
    with ties broken in raster order; ``quantile=None`` keeps as many pixels as the mask has.
    """
    maps, masks = _prepare(maps, masks)
    n = maps.shape[0]
    flat = maps.reshape(n, -1)
    hw = flat.shape[1]
    if quantile is None:
        k = masks.reshape(n, -1).sum(dim=1)
    else:
        if not 0.0 < float(quantile) <= 1.0:
            raise DataError(f"quantile must lie in (0, 1], got {quantile}")
        k = torch.full((n,), max(1, round(float(quantile) * hw)), dtype=torch.int64, device=maps.device)
    top = pixel_ranks(flat) < k.view(n, 1)
    m = masks.reshape(n, -1)
    inter = (top & m).sum(dim=1).to(torch.float32)
    union = (top | m).sum(dim=1).to(torch.float32)
    return inter / union
