"""What a dissection returns: one label per unit and the layer's IoU table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..topk import TopKActivations
from .concepts import ConceptSpace
from .config import DissectConfig
from .tally import iou_from_counts

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


def layer_result(layer: str, space: ConceptSpace, thresholds: torch.Tensor, inter: torch.Tensor,
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
