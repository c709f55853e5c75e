"""Regularizers of the image-optimization loop: penalties subtracted from the objective (:class:`L2Penalty`,
Simonyan et al. 2014 Eq. 1; :class:`AlphaNorm` and :class:`TotalVariation`, Mahendran & Vedaldi 2015 Eq. 3-4;
:class:`CodePenalty`, Nguyen et al. 2016) and projections applied to the image after each step (:class:`Decay`,
:class:`Blur`, :class:`ClipNorm`, :class:`ClipContribution`, Yosinski et al. 2015 Sec. 3; survey Eq. 9).
:class:`Regularization` holds the hyperparameters of all of them (and of the jitter / scale transforms) in one object
that methods pass whole to :func:`~convscope.core.optim.optimize_images`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from ...errors import ConvscopeError
from ..imageops import gaussian_blur
from .params import GeneratorImage
from .transforms import Jitter, RandomScale, Transform

Schedule = Callable[[int], float]  # step (0-based) -> factor (of a step size or a penalty weight)


def schedule_factor(value: float, step: int, what: str) -> float:
    """``value``, a schedule's factor at ``step``, checked finite and >= 0 (``what`` names the schedule)."""
    f = float(value)
    if not (math.isfinite(f) and f >= 0):
        raise ConvscopeError(f"{what} schedule gave {f!r} at step {step}; a schedule must return a finite factor "
                             ">= 0 for every step")
    return f


def decay(x: torch.Tensor, theta_decay: float) -> torch.Tensor:
    """L2 decay (Yosinski et al. 2015, Sec. 3): ``r(x) = (1 - theta_decay) x``."""
    return (1 - theta_decay) * x


def _percentile_rows(v: torch.Tensor, pct: float) -> torch.Tensor:
    """Per-row ``pct``-th percentile of ``N x M`` with linear interpolation (as ``numpy.percentile``), ``N x 1``.

    Only the two order statistics around the position are selected (``topk`` from the nearer end, not a full sort;
    the same values a sort gives). No size limit (``torch.quantile`` refuses more than 2^24 elements)."""
    m = v.shape[1]
    pos = pct / 100.0 * (m - 1)
    i0 = min(int(math.floor(pos)), m - 1)
    i1 = min(i0 + 1, m - 1)
    frac = pos - i0
    if i1 < m - 1 - i0:  # the i0-th and i1-th smallest: the last two of the i1 + 1 smallest
        s = v.topk(i1 + 1, dim=1, largest=False, sorted=True).values
        lo, hi = s[:, i0], s[:, i1]
    else:  # from the top: the i0-th smallest is the (m - i0)-th largest
        s = v.topk(m - i0, dim=1, largest=True, sorted=True).values
        lo, hi = s[:, m - 1 - i0], s[:, m - 1 - i1]
    return (lo + frac * (hi - lo)).unsqueeze(1)


def clip_small_norm(x: torch.Tensor, theta_n_pct: float) -> torch.Tensor:
    """Zero the pixels whose norm over the channels is below the ``theta_n_pct`` percentile of the image
    (Yosinski et al. 2015, Sec. 3, "clipping pixels with small norm")."""
    norms = (x * x).sum(dim=1).sqrt().flatten(1)  # N x HW (a strided ``x.norm(dim=1)`` is ~30x slower on CPU)
    small = (norms < _percentile_rows(norms, theta_n_pct)).view(x.shape[0], 1, *x.shape[2:])
    return x.masked_fill(small, 0.0)


def clip_small_contribution(x: torch.Tensor, grad: torch.Tensor, theta_c_pct: float) -> torch.Tensor:
    """Zero the pixels whose contribution ``|sum_c x ⊙ dA/dx|`` (the linear estimate of how much the activation
    changes when the pixel is set to zero) is below the ``theta_c_pct`` percentile of the image (Yosinski et al.
    2015, Sec. 3, "clipping pixels with small contribution"; as their toolbox's ``px_abs_benefit_percentile``)."""
    contrib = (x * grad).sum(dim=1).abs().flatten(1)
    small = (contrib < _percentile_rows(contrib, theta_c_pct)).view(x.shape[0], 1, *x.shape[2:])
    return x.masked_fill(small, 0.0)


class Regularizer:
    """A penalty subtracted from the objective (``penalty``) and/or a projection applied after each step
    (``project``). Both see the image as its deviation from the centre image (mean colour), in input space."""

    projection = False

    def set_step(self, step: int) -> None:
        """Called by the loop before each step's penalty (``step`` 0-based); scheduled penalties read it."""
        return None

    def penalty(self, delta: torch.Tensor) -> torch.Tensor | None:
        """Per-image penalty ``N`` (differentiable), or None."""
        return None

    def project(self, delta: torch.Tensor, grad: torch.Tensor, step: int) -> torch.Tensor:
        """The new deviation after step ``step`` (0-based); ``grad`` is the step's gradient of the (penalized)
        objective w.r.t. ``delta``."""
        return delta


@dataclass(frozen=True)
class L2Penalty(Regularizer):
    """``lambda_l2 * ||x - c||^2`` per image (Simonyan et al. 2014, Eq. 1: ``S_c(I) - lambda ||I||_2^2`` on the
    mean-subtracted image)."""

    lambda_l2: float

    def penalty(self, delta: torch.Tensor) -> torch.Tensor:
        return self.lambda_l2 * delta.pow(2).flatten(1).sum(1)


def alpha_norm(x: torch.Tensor, alpha: float = 6.0) -> torch.Tensor:
    """``||x||_alpha^alpha = sum_{c,i,j} |x_cij|^alpha`` per image, ``N`` (Mahendran & Vedaldi 2015, Eq. 3; survey
    Eq. 14)."""
    return x.abs().pow(alpha).flatten(1).sum(1)


def total_variation(x: torch.Tensor, beta: float = 2.0, eps: float = 1e-12) -> torch.Tensor:
    """``TV_beta(x) = sum_{c,i,j} ((x_{c,i,j+1} - x_cij)^2 + (x_{c,i+1,j} - x_cij)^2)^(beta/2)`` per image, ``N``,
    over ``i < H-1, j < W-1`` (Mahendran & Vedaldi 2015, Eq. 4; survey Eq. 15). For ``beta < 2`` the squared
    gradient is clamped at ``eps`` so the gradient stays finite on flat regions."""
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    s = dx * dx + dy * dy
    if beta == 2:
        return s.flatten(1).sum(1)
    return s.clamp_min(eps).pow(beta / 2).flatten(1).sum(1)


@dataclass(frozen=True)
class AlphaNorm(Regularizer):
    """``lambda_alpha * ||x / B||_alpha^alpha / (H W)`` per image (Mahendran & Vedaldi 2015, Eq. 3 with the
    normalization of their Sec. 3.3): ``B`` is a typical pixel magnitude (in the units of ``x - c``, the deviation
    from the centre image), so ``lambda_alpha`` is dimensionless and transfers between models and image sizes. A
    large ``alpha`` (6) mostly penalizes the pixels that leave the typical range."""

    lambda_alpha: float
    alpha: float = 6.0
    B: float = 1.0

    def penalty(self, delta: torch.Tensor) -> torch.Tensor:
        h, w = delta.shape[-2:]
        return self.lambda_alpha * alpha_norm(delta / self.B, self.alpha) / (h * w)


@dataclass(frozen=True)
class TotalVariation(Regularizer):
    """``lambda_tv * TV_beta(x / V) / (H W)`` per image (Mahendran & Vedaldi 2015, Eq. 4 with the normalization of
    their Sec. 3.3): ``V`` is a typical difference between neighbouring pixels (the paper's ``V = B / 6.5``), so
    ``lambda_tv`` is dimensionless. ``beta = 2`` smooths; ``beta = 1`` (classic TV) allows sharp edges."""

    lambda_tv: float
    beta: float = 2.0
    V: float = 1.0

    def penalty(self, delta: torch.Tensor) -> torch.Tensor:
        h, w = delta.shape[-2:]
        return self.lambda_tv * total_variation(delta / self.V, self.beta) / (h * w)


@dataclass(frozen=True)
class Decay(Regularizer):
    """``x <- (1 - theta_decay) x`` after each step (Yosinski et al. 2015)."""

    theta_decay: float
    projection = True

    def project(self, delta: torch.Tensor, grad: torch.Tensor, step: int) -> torch.Tensor:
        return decay(delta, self.theta_decay)


@dataclass(frozen=True)
class Blur(Regularizer):
    """Gaussian blur of width ``sigma`` pixels every ``every`` steps (steps 0, every, 2 every, ...; Yosinski et al.
    2015, theta_b_width and theta_b_every), with :func:`~convscope.core.imageops.gaussian_blur`."""

    sigma: float
    every: int = 1
    projection = True

    def project(self, delta: torch.Tensor, grad: torch.Tensor, step: int) -> torch.Tensor:
        return gaussian_blur(delta, self.sigma) if step % self.every == 0 else delta


@dataclass(frozen=True)
class ClipNorm(Regularizer):
    """Zero pixels with norm below the ``theta_n_pct`` percentile, after each step (Yosinski et al. 2015)."""

    theta_n_pct: float
    projection = True

    def project(self, delta: torch.Tensor, grad: torch.Tensor, step: int) -> torch.Tensor:
        return clip_small_norm(delta, self.theta_n_pct)


@dataclass(frozen=True)
class ClipContribution(Regularizer):
    """Zero pixels with contribution below the ``theta_c_pct`` percentile, after each step (Yosinski et al. 2015)."""

    theta_c_pct: float
    projection = True

    def project(self, delta: torch.Tensor, grad: torch.Tensor, step: int) -> torch.Tensor:
        return clip_small_contribution(delta, grad, self.theta_c_pct)


class Scheduled(Regularizer):
    """A penalty whose weight follows a schedule: ``schedule(k) * inner.penalty(x)`` at step ``k`` (e.g.
    ``Scheduled(TotalVariation(1.0, V=v), geometric(1e-2, 1e-4, steps))`` anneals lambda_TV from 1e-2 to 1e-4).
    The loop sets the step (:meth:`set_step`); outside a loop it is step 0."""

    def __init__(self, inner: Regularizer, schedule: Schedule) -> None:
        if not isinstance(inner, Regularizer) or inner.projection:
            raise ConvscopeError("Scheduled needs a penalty regularizer (AlphaNorm, TotalVariation, L2Penalty, ...), "
                                 f"not {type(inner).__name__}; projections have no weight to schedule")
        if not callable(schedule):
            raise ConvscopeError("Scheduled: schedule must be a callable step -> factor, e.g. geometric(1, 0.01, 200)")
        self.inner, self.schedule = inner, schedule
        self.step = 0

    def set_step(self, step: int) -> None:
        self.step = int(step)
        self.inner.set_step(step)

    @property
    def factor(self) -> float:
        """The weight at the current step."""
        return schedule_factor(self.schedule(self.step), self.step, "Scheduled: the penalty weight's")

    def penalty(self, delta: torch.Tensor) -> torch.Tensor | None:
        pen = self.inner.penalty(delta)
        return None if pen is None else self.factor * pen


class CodePenalty(Regularizer):
    """``lambda_code * ||h_i||^2`` per image on the codes of a :class:`GeneratorImage`: the L2 prior on the code of
    DGN-AM (Nguyen et al. 2016; survey Eq. 10, ``h* = argmax_h a_i(G(h)) - lambda ||h||``, squared here). It reads
    the codes of ``param``, not the image it is given."""

    def __init__(self, param: GeneratorImage, lambda_code: float) -> None:
        if not isinstance(param, GeneratorImage):
            raise ConvscopeError("CodePenalty needs the GeneratorImage whose codes it penalizes")
        if not lambda_code >= 0:
            raise ConvscopeError(f"lambda_code={lambda_code!r}: use a weight >= 0")
        self.param, self.lambda_code = param, float(lambda_code)

    def penalty(self, delta: torch.Tensor) -> torch.Tensor | None:
        if not self.lambda_code:
            return None
        return self.lambda_code * self.param.code.pow(2).flatten(1).sum(1)


# --------------------------------------------------------------------------- all hyperparameters in one object


@dataclass(frozen=True)
class Regularization:
    """Hyperparameters of a regularized image optimization; 0 / empty switches a term off. Named as in the papers.

    ``lambda_l2``: Simonyan et al.'s penalty ``lambda ||x - c||^2`` (``c`` the mean colour; sum over pixels, input
    space). ``lambda_alpha`` / ``alpha`` / ``B`` and ``lambda_tv`` / ``beta`` / ``V``: Mahendran & Vedaldi's
    normalized alpha-norm and TV_beta priors (:class:`AlphaNorm`, :class:`TotalVariation`; ``B`` and ``V`` in the
    model's input units). ``theta_decay``, ``blur_every`` / ``blur_sigma`` (theta_b_every / theta_b_width),
    ``theta_n_pct``, ``theta_c_pct``: Yosinski et al.'s projections. ``jitter`` (pixels) and ``scales`` (zoom factors
    drawn each step): transformation robustness (Mordvintsev et al. 2015; Olah et al. 2017).
    """

    lambda_l2: float = 0.0
    theta_decay: float = 0.0
    blur_every: int = 0
    blur_sigma: float = 0.0
    theta_n_pct: float = 0.0
    theta_c_pct: float = 0.0
    jitter: int = 0
    scales: tuple[float, ...] = ()
    lambda_alpha: float = 0.0
    alpha: float = 6.0
    B: float = 1.0
    lambda_tv: float = 0.0
    beta: float = 2.0
    V: float = 1.0

    def __post_init__(self) -> None:
        bad = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
               if f.name != "scales" and not getattr(self, f.name) >= 0]
        if not 0 <= self.theta_n_pct <= 100 or not 0 <= self.theta_c_pct <= 100:
            bad.append("theta_n_pct / theta_c_pct must be percentiles in [0, 100]")
        if not 0 <= self.theta_decay < 1:
            bad.append(f"theta_decay={self.theta_decay} must be in [0, 1)")
        if self.blur_every and not self.blur_sigma > 0:
            bad.append("blur_every needs blur_sigma > 0")
        bad += [f"{name}={getattr(self, name)!r} must be > 0" for name in ("alpha", "B", "beta", "V")
                if getattr(self, name) >= 0 and not getattr(self, name) > 0]
        if bad:
            raise ConvscopeError(f"Regularization: {'; '.join(bad)}")
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))

    def regularizers(self) -> list[Regularizer]:
        """The penalties (L2, alpha-norm, TV), then the projections in Yosinski et al.'s order (decay, blur, norm
        clip, contribution clip)."""
        out: list[Regularizer] = []
        if self.lambda_l2:
            out.append(L2Penalty(self.lambda_l2))
        if self.lambda_alpha:
            out.append(AlphaNorm(self.lambda_alpha, self.alpha, self.B))
        if self.lambda_tv:
            out.append(TotalVariation(self.lambda_tv, self.beta, self.V))
        if self.theta_decay:
            out.append(Decay(self.theta_decay))
        if self.blur_every and self.blur_sigma:
            out.append(Blur(self.blur_sigma, self.blur_every))
        if self.theta_n_pct:
            out.append(ClipNorm(self.theta_n_pct))
        if self.theta_c_pct:
            out.append(ClipContribution(self.theta_c_pct))
        return out

    def transforms(self) -> list[Transform]:
        """Jitter first, then random scale."""
        out: list[Transform] = []
        if self.jitter:
            out.append(Jitter(int(self.jitter)))
        if self.scales:
            out.append(RandomScale(self.scales))
        return out
