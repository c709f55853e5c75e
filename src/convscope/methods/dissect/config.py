"""Network Dissection's configuration, passed explicitly to every stage (Bau et al. 2017)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from ...core.batching import BatchSize, check_batch_size
from ...errors import ConvscopeError

# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DissectConfig:
    """Settings of :func:`dissect` (NetDissect-Lite's ``settings.py``, passed explicitly).

    Attributes:
        quantile: ``P(a_f > T_f)``, the top fraction of each unit's activations that forms its mask (Eq. 18).
        iou_threshold: a unit detects its best concept when ``IoU > iou_threshold``.
        batch_size: images per forward pass; ``"auto"`` (default) picks it from the model's activation sizes and
            the allocator (:mod:`convscope.core.batching`), once per run (a resumed run keeps its first choice).
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
    batch_size: BatchSize = "auto"
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
        check_batch_size(self.batch_size, "DissectConfig")
        for name in ("top_images", "checkpoint_every"):
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
