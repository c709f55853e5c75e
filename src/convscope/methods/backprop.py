"""Modified backpropagation: guided backpropagation, the DeconvNet rule, guided Grad-CAM.

Both rules are backward-rule swaps on every ReLU / ReLU6 of the model (module or functional, in place or not),
done by :func:`convscope.probe` with ``relu_rule=``; nothing else in the backward pass changes. With ``R`` the
signal arriving at a ReLU's output and ``f`` its input in the forward pass:

* plain gradient:   ``R_in = R * 1[f > 0]``
* DeconvNet (Zeiler & Fergus 2014, Sec. 2.1, "rectification"): ``R_in = max(R, 0)`` -- the forward mask is ignored;
* guided backpropagation (Springenberg et al. 2015, Sec. 3.4, Fig. 1): ``R_in = max(R, 0) * 1[f > 0]`` -- both.

For ReLU6 the forward mask is ``1[0 < f < 6]``. Max-pooling keeps its switches (the ordinary gradient), as in
both papers. Guided Grad-CAM (Selvaraju et al. 2017, Sec. 3.1) multiplies guided backpropagation point-wise by
the Grad-CAM map upsampled to the input.

All return signed, per-channel ``N x K x C x H x W`` tensors (K targets per image; see
:mod:`convscope.core.targets`): one forward pass and the K backward passes batched.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.attribution import check_input, input_gradient
from ..core.targets import Target, pinned, top_class
from .cam import gradcam, resolve_cam_layer


def guided_backprop(model: nn.Module, x: torch.Tensor, target: Target = top_class) -> torch.Tensor:
    """Guided backpropagation (Springenberg et al. 2015): ``N x K x C x H x W``."""
    check_input(x, "guided_backprop")
    return input_gradient(model, x, target, relu_rule="guided").grads


def deconvnet_rule(model: nn.Module, x: torch.Tensor, target: Target = top_class) -> torch.Tensor:
    """The DeconvNet backward rule (Zeiler & Fergus 2014) applied from the output: ``N x K x C x H x W``.

    This is the class-score version (as Simonyan et al. 2014, Sec. 4, relate it to the gradient); the projection
    of one unit of a layer down to pixels is :func:`convscope.deconvnet`.
    """
    check_input(x, "deconvnet_rule")
    return input_gradient(model, x, target, relu_rule="deconvnet").grads


def guided_gradcam(model: nn.Module, x: torch.Tensor, target: Target = top_class, layer: str = "") -> torch.Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017, Sec. 3.1): guided backprop x upsampled Grad-CAM, ``N x K x C x H x W``.

    ``layer`` is any convolutional layer (default: the last feature map). Two passes, one per backward rule; the
    Grad-CAM pass explains the classes the guided pass resolved (so ``top_class`` means the same class in both).
    """
    check_input(x, "guided_gradcam")
    layer = resolve_cam_layer(model, layer)  # a bad name fails before any pass
    guided = input_gradient(model, x, target, relu_rule="guided")
    cam = gradcam(model, x, target=pinned(target, guided.indices) if guided.indices is not None else target,
                  layer=layer)
    return guided.grads * cam.unsqueeze(2)
