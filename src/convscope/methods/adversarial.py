"""Adversarial examples and what they do to the feature maps (survey Sec. 7.2).

* FGSM (Goodfellow, Shlens & Szegedy 2015, Eq. 3): ``x' = x + eps * sign(d J(x, y) / d x)``, one step.
* PGD (Madry et al. 2018, Eq. 2): ``x^{t+1} = Proj_{B(x, eps)}(x^t + alpha * s(d J / d x^t))`` with ``s = sign`` for
  the L-inf ball and ``s = g / ||g||_2`` for the L2 ball, from a random start inside the ball.

``J`` is the cross-entropy on the logits.  Untargeted attacks ascend ``J(x, y)`` for the true (by default the
clean top) class ``y``; targeted attacks descend ``J(x, t)`` for the target class ``t``.  ``eps`` and ``alpha`` are
in *pixel* units (RGB in [0, 1], e.g. ``8/255``), whatever the model's normalization: the attack runs on the
pixels, the model's ``preprocess`` maps them to its input, and adversarial pixels stay in ``[0, 1]``.

:func:`feature_change` compares the clean and adversarial feature maps of a layer unit by unit
(``||A'_k - A_k||_2 / ||A_k||_2``, see :class:`FeatureChange`) and ranks the units whose maps change most
(survey Fig. 20).

Every step is one forward and one backward of the whole batch through the core attribution loop (parameters
frozen, the model restored afterwards).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attribution import check_input, input_gradient, pinned_class
from ..core.images import Preprocess
from ..core.layers import resolve_layer
from ..core.model import lenient_preprocess
from ..core.probe import preserved_state
from ..core.stream import layer_features
from ..core.targets import Target, scores_of, top_class
from ..errors import ConvscopeError

NORMS = ("linf", "l2")


@dataclass(frozen=True)
class AdversarialResult:
    """Adversarial images and how the model's decision moved.

    ``x``: adversarial images in the model's input space (``N x C x H x W``, feed them to the model);
    ``delta``: the perturbation in pixel units (adversarial minus clean RGB, in ``[-eps, eps]`` for L-inf);
    ``clean_class`` / ``adv_class``: top-1 classes before / after; ``clean_prob`` / ``adv_prob``: their softmax
    probabilities; ``label``: the class attacked (moved away from) or targeted; ``success``: the attack reached its
    goal (untargeted: top-1 differs from ``label``; targeted: top-1 is ``label``); ``steps``: the first step at
    which it succeeded (``-1``: never).
    """

    x: torch.Tensor
    delta: torch.Tensor
    clean_class: torch.Tensor
    adv_class: torch.Tensor
    clean_prob: torch.Tensor
    adv_prob: torch.Tensor
    label: torch.Tensor
    success: torch.Tensor
    steps: torch.Tensor
    targeted: bool
    norm: str
    eps: float


def fgsm(model: nn.Module, x: torch.Tensor, target: Target | None = top_class, eps: float = 2 / 255,
         targeted: bool = False, preprocess: Preprocess | None = None) -> AdversarialResult:
    """Fast gradient sign method (Goodfellow et al. 2015, Eq. 3): one L-inf step of size ``eps`` (pixel units).

    ``target``: the class to move away from (default, or None: the clean top class) or, with ``targeted=True``, the
    class to reach (required then).
    """
    check_input(x, "fgsm")
    return pgd(model, x, target, eps=eps, alpha=eps, steps=1, norm="linf", targeted=targeted, random_start=False,
               preprocess=preprocess)


def pgd(model: nn.Module, x: torch.Tensor, target: Target | None = top_class, eps: float = 2 / 255,
        alpha: float | None = None, steps: int = 10, norm: str = "linf", targeted: bool = False,
        random_start: bool = True, seed: int = 0, preprocess: Preprocess | None = None) -> AdversarialResult:
    """Projected gradient descent (Madry et al. 2018) in the L-inf or L2 ball of radius ``eps`` (pixel units).

    ``alpha`` is the step (default ``2.5 * eps / steps``, Madry et al.); ``random_start`` draws the start
    uniformly in the L-inf ball or on a random direction in the L2 ball (seeded). ``preprocess`` maps pixels to
    the model's input (default: ``model.preprocess``; none means the model takes RGB in [0, 1]). ``target``: the
    class to move away from (default, or None: the clean top class, i.e. the predicted one) or, with
    ``targeted=True``, the class to reach (required then: the clean top class is reached already).
    """
    check_input(x, "pgd")
    if target is None or target is top_class:
        if targeted:
            raise ConvscopeError("a targeted attack needs target=CLASS, the class to reach (an int or one per "
                                 "image); the default, the clean top class, is reached already")
        target = top_class
    if norm not in NORMS:
        raise ConvscopeError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")
    if not eps > 0 or steps < 1:
        raise ConvscopeError(f"need eps > 0 and steps >= 1, got eps={eps}, steps={steps}; eps is in pixel units "
                             "(RGB in [0, 1]), e.g. 8/255")
    pre = preprocess if preprocess is not None else lenient_preprocess(model)
    alpha = 2.5 * eps / steps if alpha is None else alpha
    if not alpha > 0:
        raise ConvscopeError(f"need a step alpha > 0, got alpha={alpha}; it is in pixel units like eps (default "
                             "2.5 * eps / steps)")
    x = x.detach()
    with torch.no_grad(), preserved_state(model):
        out_clean = scores_of(model(x), target)  # one clean pass: the label to attack and the clean probabilities
    label = pinned_class(model, x, target, "an attack", out_clean)
    pixels = pre.denormalize(x).clamp(0, 1)
    _, std = pre._stats(x)
    sign = -1.0 if targeted else 1.0
    n = x.shape[0]
    first = torch.full((n,), -1, dtype=torch.long, device=x.device)
    step_preds: list[torch.Tensor] = []

    def objective(out: torch.Tensor) -> torch.Tensor:  # ascend: CE away from the label, or towards the target
        out = scores_of(out, target)
        step_preds.append(out.detach().argmax(1))
        return sign * F.cross_entropy(out, label, reduction="none")

    delta = torch.zeros_like(pixels)
    if random_start:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.rand(pixels.shape, generator=gen).to(pixels) * 2 - 1
        delta = eps * (noise if norm == "linf" else noise / _l2(noise).view(-1, 1, 1, 1))
        delta = (pixels + delta).clamp(0, 1) - pixels
    for step in range(steps):
        g = input_gradient(model, pre.normalize(pixels + delta), objective).grads[:, 0] / std  # d J / d pixels
        _mark(first, step_preds[-1], label, targeted, step)
        if norm == "linf":
            delta = (delta + alpha * g.sign()).clamp(-eps, eps)
        else:
            delta = delta + alpha * g / _l2(g).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta = delta * (eps / _l2(delta).clamp_min(1e-12)).clamp(max=1).view(-1, 1, 1, 1)
        delta = (pixels + delta).clamp(0, 1) - pixels
    x_adv = pre.normalize(pixels + delta)
    with torch.no_grad(), preserved_state(model):
        p_adv = F.softmax(scores_of(model(x_adv), target), 1)
    p_clean = F.softmax(out_clean, 1)
    adv_class = p_adv.argmax(1)
    _mark(first, adv_class, label, targeted, steps)
    success = adv_class == label if targeted else adv_class != label
    clean_class = p_clean.argmax(1)
    return AdversarialResult(
        x=x_adv.detach(), delta=delta.detach(), clean_class=clean_class, adv_class=adv_class,
        clean_prob=p_clean.gather(1, clean_class[:, None])[:, 0], adv_prob=p_adv.gather(1, adv_class[:, None])[:, 0],
        label=label, success=success, steps=first, targeted=targeted, norm=norm, eps=float(eps))


def _l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def _mark(first: torch.Tensor, pred: torch.Tensor, label: torch.Tensor, targeted: bool, step: int) -> None:
    """Record the first step at which each image's prediction reached the goal (step 0 is the start point)."""
    reached = pred == label if targeted else pred != label
    first[(first < 0) & reached] = step


@dataclass(frozen=True)
class FeatureChange:
    """Clean vs adversarial feature maps of one layer.

    ``clean`` / ``adversarial``: ``N x C x h x w``; ``change``: ``N x C``, the relative L2 change of each unit's map
    ``||A'_k - A_k|| / max(||A_k||, median_j ||A_j||)``: relative to the unit's own clean map, or to the layer's
    median unit when the unit is nearly silent (a silent unit that starts firing ranks high; noise in a silent
    unit does not).
    """

    layer: str
    clean: torch.Tensor
    adversarial: torch.Tensor
    change: torch.Tensor

    def top_units(self, k: int = 8) -> torch.Tensor:
        """``N x k``: the units whose maps change most, per image, most changed first."""
        return self.change.topk(min(k, self.change.shape[1]), dim=1).indices


def feature_change(model: nn.Module, x_clean: torch.Tensor, x_adv: torch.Tensor, layer: str) -> FeatureChange:
    """Compare a layer's feature maps on clean and adversarial images (one forward pass of both, stopped at the
    layer)."""
    check_input(x_clean, "feature_change")
    if x_clean.shape != x_adv.shape:
        raise ConvscopeError(f"clean and adversarial batches differ in shape: {tuple(x_clean.shape)} vs "
                             f"{tuple(x_adv.shape)}")
    name, _ = resolve_layer(model, layer)
    acts = layer_features(model, torch.cat([x_clean.detach(), x_adv.detach()]), name)[name]
    if acts.dim() < 2:
        raise ConvscopeError(f"layer {name!r} outputs shape {tuple(acts.shape)}; need N x C x ...")
    a, b = acts.float().chunk(2)
    diff = (b - a).flatten(2).norm(dim=2)
    base = a.flatten(2).norm(dim=2)
    floor = base.median(dim=1, keepdim=True).values.clamp_min(1e-12)  # near-silent units do not dominate the ranking
    change = diff / torch.maximum(base, floor)
    return FeatureChange(name, a, b, change)
