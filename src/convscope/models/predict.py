"""Top-k predictions with class names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core.model import model_classes
from ..core.probe import preserved_state


@dataclass(frozen=True)
class Prediction:
    """One ranked class for one image."""

    index: int
    name: str
    probability: float
    logit: float


def rank_logits(logits: torch.Tensor, classes: Sequence[str] | None, k: int = 5) -> list[list[Prediction]]:
    """The top-``k`` classes of each row of ``logits`` (``N x K``): softmax probability, logit and class name."""
    probs = logits.float().softmax(1)
    top = probs.topk(min(k, probs.shape[1]), dim=1)

    def name(c: int) -> str:
        return classes[c] if classes is not None and c < len(classes) else f"class {c}"

    return [[Prediction(int(c), name(int(c)), float(p), float(logits[i, c]))
             for p, c in zip(top.values[i], top.indices[i])] for i in range(len(logits))]


def predict(model: nn.Module, x: torch.Tensor, k: int = 5, batch_size: int = 32) -> list[list[Prediction]]:
    """The top-``k`` classes of each image (softmax probabilities and logits), model left as it came."""
    classes = model_classes(model)
    rows: list[list[Prediction]] = []
    with preserved_state(model), torch.no_grad():
        for chunk in x.split(batch_size):
            rows += rank_logits(model(chunk).reshape(len(chunk), -1), classes, k)
    return rows
