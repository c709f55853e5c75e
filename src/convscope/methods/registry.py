"""The one list of attribution methods: name, function, whether it reads a layer, its shape, title and citation.

``convscope explain``, ``convscope evaluate attribution`` and the web explorer read it, so a method is added here
once. ``per_channel`` methods return signed ``N x K x C x H x W`` results, the others ``N x K x H x W`` maps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConvscopeError
from .backprop import deconvnet_rule, guided_backprop, guided_gradcam
from .cam import cam, gradcam, gradcam_pp, layercam, scorecam
from .cnn_fixations import cnn_fixations
from .integrated_gradients import integrated_gradients
from .lrp import lrp
from .occlusion import occlusion
from .prediction_difference import prediction_difference
from .rollout import attention_rollout
from .saliency import gradient, input_x_gradient, saliency, smoothgrad
from .visual_backprop import visual_backprop

__all__ = ["ATTRIBUTION_METHODS", "AttributionMethod", "attribution_method"]


@dataclass(frozen=True)
class AttributionMethod:
    """One attribution method; ``function(model, x, target, [layer=...], **options)``."""

    name: str
    function: Callable[..., Any]
    needs_layer: bool
    per_channel: bool
    title: str
    citation: str

    @property
    def description(self) -> str:
        """``"title (citation)"``, as the explain page states it."""
        return f"{self.title} ({self.citation})"

    def maps(self, model: nn.Module, x: torch.Tensor, target: Any, layer: str = "", **options: Any) -> torch.Tensor:
        """The method's result tensor (occlusion's ``.maps``); ``layer`` is passed only where the method reads one."""
        if self.needs_layer:
            options["layer"] = layer
        out = self.function(model, x, target, **options)
        return out.maps if hasattr(out, "maps") else out


_METHODS = (
    AttributionMethod("saliency", saliency, False, False, "gradient saliency, max_c |d score / d x|",
                      "Simonyan et al. 2014"),
    AttributionMethod("gradient", gradient, False, True, "the raw input gradient d score / d x, per channel",
                      "Simonyan et al. 2014"),
    AttributionMethod("input_x_gradient", input_x_gradient, False, True, "gradient x input, per channel",
                      "Shrikumar et al. 2016"),
    AttributionMethod("smoothgrad", smoothgrad, False, True, "SmoothGrad: the gradient averaged over noisy copies",
                      "Smilkov et al. 2017"),
    AttributionMethod("guided", guided_backprop, False, True, "guided backpropagation", "Springenberg et al. 2015"),
    AttributionMethod("deconv", deconvnet_rule, False, True, "DeconvNet backward rule", "Zeiler & Fergus 2014"),
    AttributionMethod("cam", cam, True, False, "CAM", "Zhou et al. 2016"),
    AttributionMethod("gradcam", gradcam, True, False, "Grad-CAM", "Selvaraju et al. 2017"),
    AttributionMethod("gradcam++", gradcam_pp, True, False, "Grad-CAM++", "Chattopadhay et al. 2018"),
    AttributionMethod("guided-gradcam", guided_gradcam, True, True, "guided Grad-CAM", "Selvaraju et al. 2017"),
    AttributionMethod("occlusion", occlusion, False, False,
                      "occlusion sensitivity: drop in the class score under a grey square", "Zeiler & Fergus 2014"),
    AttributionMethod("integrated-gradients", integrated_gradients, False, True,
                      "integrated gradients: gradients along the path from a baseline, times (x - baseline)",
                      "Sundararajan et al. 2017"),
    AttributionMethod("scorecam", scorecam, True, False,
                      "Score-CAM: feature maps weighted by the class score of the input they mask", "Wang et al. 2020"),
    AttributionMethod("layercam", layercam, True, False,
                      "Layer-CAM: feature maps weighted per position by their positive gradients", "Jiang et al. 2021"),
    AttributionMethod("lrp", lrp, False, True, "layer-wise relevance propagation (epsilon rule)",
                      "Bach et al. 2015; Montavon et al. 2018"),
    AttributionMethod("visual-backprop", visual_backprop, False, False,
                      "VisualBackProp: averaged ReLU maps deconvolved, multiplied down to the input (class-agnostic)",
                      "Bojarski et al. 2016"),
    AttributionMethod("cnn-fixations", cnn_fixations, False, False,
                      "CNN fixations: the forward pass unravelled from the class neuron to pixels, blurred",
                      "Mopuri et al. 2017"),
    AttributionMethod("prediction-difference", prediction_difference, False, False,
                      "prediction difference analysis: weight of evidence (bits) of each window, conditional sampling",
                      "Zintgraf et al. 2017"),
    AttributionMethod("rollout", attention_rollout, False, False,
                      "attention rollout: attention propagated through the blocks (class-agnostic, ViT only)",
                      "Abnar & Zuidema 2020"),
)

ATTRIBUTION_METHODS: dict[str, AttributionMethod] = {m.name: m for m in _METHODS}
"""Every attribution method by name, in the order the CLI offers them."""


def attribution_method(name: str) -> AttributionMethod:
    """The registry entry ``name``; a ConvscopeError naming the valid ones otherwise."""
    try:
        return ATTRIBUTION_METHODS[name]
    except KeyError:
        raise ConvscopeError(f"unknown attribution method {name!r}; use one of "
                             f"{', '.join(ATTRIBUTION_METHODS)}") from None
