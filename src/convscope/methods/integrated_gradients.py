"""Integrated Gradients (Sundararajan, Taly & Yan 2017).

Eq. 1: ``IG_i(x) = (x_i - x'_i) * int_0^1 dF(x' + a (x - x')) / dx_i da`` along the straight path from a baseline
``x'`` to the image ``x``. Eq. 3 approximates the integral by a sum over ``m`` points of the path; here the points
``a_s`` and weights ``w_s`` come from a quadrature rule:

* ``"adaptive"`` (default): adaptive quadrature (Kuncir 1962) driven by completeness itself: the trapezoid rule on
  a grid that starts evenly spaced and is refined, a few points per round, by halving the segments whose exact
  completeness residual is largest (see below);
* ``"kink"``: the ``m`` points placed where the target score changes along the path, from a forward-only
  pre-pass (:func:`adaptive_quadrature`; this project's earlier default);
* ``"gausslegendre"``: ``numpy.polynomial.legendre.leggauss(m)`` mapped from [-1, 1] to [0, 1]
  (exact for a gradient polynomial of degree <= 2m - 1 along the path; Captum's default);
* ``"riemann_left"`` / ``"riemann_right"`` / ``"riemann_middle"``: ``a_s = s/m``, ``(s+1)/m``, ``(s+1/2)/m``
  (``s = 0 .. m-1``), ``w_s = 1/m`` (Eq. 3 is ``riemann_right``);
* ``"riemann_trapezoid"``: ``a_s = s/(m-1)`` (``s = 0 .. m-1``, ``m >= 2``), ``w_s = 1/(m-1)``, halved at both
  ends: the trapezoid rule, exact when the gradient is linear along the path. (Captum's ``riemann_trapezoid``
  uses ``1/m`` for the step, so its weights sum to ``(m-1)/m``; ours sum to 1.)

Completeness (Prop. 1): ``sum_i IG_i(x) = F(x) - F(x')``; ``return_error=True`` reports how far the
approximation is from it, the paper's check that ``m`` is large enough (Sec. 5 / the remark after Eq. 3: they
find 20-300 steps put the sum within 5 %).

Why ``"adaptive"``. The summed attribution is the 1-D integral of ``g(a) = dF/da`` along the path, and for a
ReLU / ReLU6 network ``F`` is piecewise linear in ``a``: ``g`` is piecewise constant with jumps at every scale,
crowded where the score climbs (EfficientNet-Lite0 at 224 px from the zero baseline: ``a`` in about [0.005, 0.1],
chelsea's logit goes from 0 to 9 there), so evenly spaced or Gauss-Legendre points miss most of them. Every
gradient point also gives ``F(a)`` (the forward pass it needs) and ``g(a) = dF/dx . (x - x')``, so the trapezoid
rule's error on each segment ``[a, b]`` of the grid is known exactly: ``e = (F(b) - F(a)) - (b - a)(g(a) + g(b))/2``
(:func:`segment_residuals`; Prop. 1 applied to the segment). The rule starts from :data:`REFINE_START` evenly
spaced points (both ends included), then, :data:`REFINE_ROUND` points per image and round, adds the midpoints of
the segments with the largest ``sum_k |e_k| / |F_k(x) - F_k(x')|`` (targets weighted equally) until ``m`` points
are used; the attributions are the trapezoid sum on the final grid (weights sum to 1; each image its own grid, one
grid for all targets of an image). No forward pre-pass. The gradients of every point are kept until the grid is
final: ``m x K`` input-sized tensors per image (images run in groups within :data:`STORE_BYTES`). Measured on the
7 bundled photos (lite0, 64 steps, docs/attribution.md): the completeness error at most 1.5 %, median 0.4 %, against
4.4 % / 1.5 % for ``"kink"`` and 14 % worst for Gauss-Legendre. The error stays irregular (a near-jump of ``F``
narrower than the finest segment cannot be resolved by halving), so check ``return_error``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..core.attribution import check_input, input_gradient, pinned_target, summed_input_gradient
from ..core.batching import BatchSize, check_batch_size, resolve_batch_size
from ..core.model import input_normalizer
from ..core.probe import preserved_state
from ..core.progress import progress_bar
from ..core.targets import OutputTarget, Target, pinned_indices, scores_of, target_scores, top_class
from ..errors import ConvscopeError

METHODS = ("adaptive", "kink", "gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right",
           "riemann_middle")
"""The quadrature rules :func:`integrated_gradients` accepts (``"adaptive"`` refines its grid from the gradients it
computes; ``"kink"`` needs the path scores of a pre-pass: :func:`adaptive_quadrature`)."""

REFINE_START = 17
"""Evenly spaced points (both ends of the path included) the ``"adaptive"`` rule starts from."""
REFINE_ROUND = 4
"""Segments the ``"adaptive"`` rule halves per image and round (the points of one round run as one batch)."""
STORE_BYTES = 1 << 30
"""The ``"adaptive"`` rule keeps every point's input gradient until its grid is final; images run in groups whose
stored gradients stay within this many bytes (one image at a time at least)."""

UNIFORM_SHARE = 0.2
"""The share of the ``"kink"`` rule's points spread evenly over the path, whatever the score does."""
KINK_POWER = 1.0
"""The ``"kink"`` rule's point density grows as the kink content of the path scores to this power."""

Baseline = float | torch.Tensor | None


@dataclass(frozen=True)
class IntegratedGradientsResult:
    """:func:`integrated_gradients` with ``return_error=True``.

    Attributes:
        attributions: ``N x K x C x H x W``, the integrated gradients.
        error: ``N x K``, the completeness error ``|sum(attributions) - (F(x) - F(x'))|`` per image and target.
        relative_error: ``N x K``, ``error / |F(x) - F(x')|`` (``inf`` where the difference is 0 and the error
            is not, 0 where both are).
        scores: ``N x K``, the target scores ``F(x)`` (logits) on the images.
        baseline_scores: ``N x K``, ``F(x')`` for the same targets on the baseline.
        targets: ``N x K`` class indices explained, or ``None`` for a callable that returns scores.
    """

    attributions: torch.Tensor
    error: torch.Tensor
    relative_error: torch.Tensor
    scores: torch.Tensor
    baseline_scores: torch.Tensor
    targets: torch.Tensor | None


def quadrature(steps: int, method: str = "gausslegendre") -> tuple[torch.Tensor, torch.Tensor]:
    """Path points ``a_s`` in [0, 1] and weights ``w_s`` (float64, ``steps`` each) of a fixed rule in :data:`METHODS`
    (``"adaptive"`` depends on the scores along the path: :func:`adaptive_quadrature`)."""
    _check_rule(steps, method)
    if method in ("adaptive", "kink"):
        raise ConvscopeError(f"quadrature(method={method!r}): its points depend on the scores along the path; use "
                             "adaptive_quadrature(path_scores, steps) for 'kink', integrated_gradients for 'adaptive'")
    m = steps
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(m)
        return torch.from_numpy((nodes + 1) / 2), torch.from_numpy(weights / 2)
    if method == "riemann_trapezoid":
        w = torch.full((m,), 1.0 / (m - 1), dtype=torch.float64)
        w[0] /= 2
        w[-1] /= 2
        return torch.linspace(0, 1, m, dtype=torch.float64), w
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
    alphas = (torch.arange(m, dtype=torch.float64) + offset) / m
    return alphas, torch.full((m,), 1.0 / m, dtype=torch.float64)


def adaptive_quadrature(path_scores: torch.Tensor, steps: int, uniform_share: float = UNIFORM_SHARE,
                        power: float = KINK_POWER) -> tuple[torch.Tensor, torch.Tensor]:
    """Points and weights (float64, ``steps`` each) placed where the slope of the score changes along the path
    (module docstring).

    ``path_scores``: ``(M + 1) x K`` (or ``M + 1``) target scores ``F(t_j)`` at ``t_j = j / M``, ``j = 0 .. M``. The
    slope on interval ``j`` is ``s_j = M (F(t_{j+1}) - F(t_j))``; each interior knot's slope change
    ``|s_j - s_{j-1}|`` is split between its two intervals, giving each interval a kink content ``c_j``. Interval
    ``j`` gets mass ``(1 - uniform_share) * mean_k(c_jk^power / sum_j c_jk^power) + uniform_share / M`` (a target
    whose slope never changes counts as uniform); [0, 1] is cut into ``steps`` segments of mass ``1 / steps``
    under that piecewise-constant density; the points are the segments' midpoints, the weights their lengths.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConvscopeError(f"adaptive_quadrature(steps={steps!r}): the number of path points must be an int >= 1")
    if not 0 <= uniform_share <= 1 or not power > 0:
        raise ConvscopeError(f"adaptive_quadrature(uniform_share={uniform_share!r}, power={power!r}): use a share "
                             "in [0, 1] and a power > 0")
    f = path_scores.detach().to(device="cpu", dtype=torch.float64)
    f = f.reshape(f.shape[0], -1)
    if f.shape[0] < 2:
        raise ConvscopeError(f"adaptive_quadrature: path_scores has {f.shape[0]} row(s); give the scores at M + 1 "
                             "evenly spaced points of the path, M >= 1")
    if not torch.isfinite(f).all():
        raise ConvscopeError("integrated_gradients(method='kink'): the target score is not finite at some point "
                             "of the path; check the model on the baseline, or use method='gausslegendre'")
    intervals = f.shape[0] - 1
    slope = (f[1:] - f[:-1]) * intervals  # M x K
    kink = (slope[1:] - slope[:-1]).abs() / 2  # M - 1 interior knots, half to each side
    content = torch.zeros_like(slope)
    content[:-1] += kink
    content[1:] += kink
    content = content ** power
    total = content.sum(0, keepdim=True)
    per_target = torch.where(total > 0, content / total.clamp_min(torch.finfo(f.dtype).tiny),
                             torch.full_like(content, 1.0 / intervals))
    mass = (1 - uniform_share) * per_target.mean(1) + uniform_share / intervals
    cdf = torch.cat([mass.new_zeros(1), mass.cumsum(0)])
    cdf = cdf / cdf[-1]
    knots = torch.linspace(0, 1, intervals + 1, dtype=torch.float64)
    levels = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    # inverse of the piecewise-linear cdf: level -> interval j with cdf[j] <= level < cdf[j + 1], then linear inside
    j = (torch.searchsorted(cdf, levels, right=True) - 1).clamp(0, intervals - 1)
    width = (cdf[j + 1] - cdf[j]).clamp_min(torch.finfo(f.dtype).tiny)
    bounds = knots[j] + (levels - cdf[j]) / width / intervals
    bounds[0], bounds[-1] = 0.0, 1.0
    return (bounds[1:] + bounds[:-1]) / 2, bounds[1:] - bounds[:-1]


def segment_residuals(alphas: torch.Tensor, scores: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """The trapezoid rule's completeness residual on each segment of a path grid: ``(P - 1) x K``.

    ``alphas``: ``P`` increasing points of [0, 1]; ``scores``: ``P x K`` target scores ``F(a)`` there; ``slopes``:
    ``P x K`` derivatives along the path ``g(a) = dF/dx (x' + a (x - x')) . (x - x')``. Segment ``j`` gets
    ``(F(a_{j+1}) - F(a_j)) - (a_{j+1} - a_j) (g(a_j) + g(a_{j+1})) / 2``: Prop. 1 of Sundararajan et al. on the
    segment says the exact integral of ``g`` over it is the score difference, so this is the rule's exact error
    there (of the summed attribution), and the residuals of a grid sum to its total completeness error.
    """
    a = alphas.reshape(-1, 1).to(torch.float64)
    f, g = scores.to(torch.float64), slopes.to(torch.float64)
    return (f[1:] - f[:-1]) - (a[1:] - a[:-1]) * (g[1:] + g[:-1]) / 2


def _check_rule(steps: int, method: str) -> None:
    if method not in METHODS:
        raise ConvscopeError(f"integrated_gradients(method={method!r}): use one of {', '.join(METHODS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConvscopeError(f"integrated_gradients(steps={steps!r}): the number of path points must be an int >= 1")
    if method in ("riemann_trapezoid", "adaptive") and steps < 2:
        raise ConvscopeError(f"integrated_gradients(method={method!r}) needs steps >= 2 (both ends of the path); use "
                             "more steps, or method='riemann_middle' for one point")


def integrated_gradients(model: nn.Module, x: torch.Tensor, target: Target = top_class, baseline: Baseline = None,
                         steps: int = 64, method: str = "adaptive", batch_size: BatchSize = "auto",
                         return_error: bool = False, progress: bool | None = None,
                         path_samples: int | None = None) -> torch.Tensor | IntegratedGradientsResult:
    """Integrated Gradients (Sundararajan et al. 2017, Eq. 1, approximated as Eq. 3): ``N x K x C x H x W``.

    ``baseline`` ``x'``: ``None`` is the zero tensor in the model's input space (Captum's default: the black image
    for a model fed raw pixels, the dataset's mean colour for one that normalizes them); a float is a grey level
    in [0, 1] mapped through the model's normalization (``0.0``: the black image, the paper's choice); a tensor is
    taken as given, in the model's input space, and must broadcast to ``x``.

    ``steps`` gradient points per image, placed by ``method`` (see the module docstring): ``"adaptive"`` (default)
    refines each image's grid where the trapezoid rule's completeness residual is largest (no extra passes; it
    keeps ``steps x K`` input gradients per image until the grid is final), ``"kink"`` places them where the score
    bends, found by a forward-only pre-pass at ``path_samples + 1`` evenly spaced points (default
    ``path_samples = steps``), or a fixed rule (``"gausslegendre"``, ``"riemann_*"``: Captum's). Gradient passes
    run at most ``batch_size`` rows at a time (rows = images x points), so the passes' memory does not grow with
    ``steps``; ``"auto"`` (default) picks it from the model's activation sizes and the allocator
    (:mod:`convscope.core.batching`). Check ``return_error``: EfficientNet-Lite0 at 224 px from the zero baseline,
    64 steps, the 7 bundled photos: at most 1.5 % adaptive (median 0.4 %), 4.4 % kink, 14 % Gauss-Legendre
    (docs/attribution.md has the table).
    Targets are fixed on the clean images first (``top_class`` is the image's own top class at every path point);
    a callable returning scores is applied at every point. ``return_error=True`` returns an
    :class:`IntegratedGradientsResult` with the completeness error. ``progress``: a bar over the steps
    (``True``, ``False``, or ``None``: once the work has run for 2 s).
    """
    check_input(x, "integrated_gradients")
    _check_rule(steps, method)
    samples = steps if path_samples is None else path_samples
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConvscopeError(f"integrated_gradients(path_samples={path_samples!r}): the number of intervals of the "
                             "forward pre-pass must be an int >= 1 (or None: as many as steps)")
    check_batch_size(batch_size, "integrated_gradients")
    x = x.detach()
    base = _baseline(model, x, baseline)
    num = x.shape[0]
    with torch.no_grad(), preserved_state(model):
        out = scores_of(model(torch.cat([x, base])), target)
    fixed = pinned_target(model, x, target, output=out[:num])
    scores, idx = target_scores(out[:num], fixed)
    base_scores, _ = target_scores(out[num:], fixed)
    diff = x - base
    idx_k = pinned_indices(fixed)
    rows = resolve_batch_size(batch_size, model, x, "integrated_gradients", grad=True, limit=steps * num,
                              multiplier=1 if idx_k is None else idx_k.shape[1])
    if method == "adaptive":
        delta = (scores - base_scores).detach()
        grads = _refined(model, base, diff, fixed, delta, steps, rows, progress)
    elif method == "kink":
        path = _path_scores(model, base, diff, fixed, samples, rows, progress)  # (M + 1) x N x K
        path[0], path[-1] = base_scores.detach(), scores.detach()
        rules = [adaptive_quadrature(path[:, i], steps) for i in range(num)]
        # each image its own points: one summed-gradient loop per image (its steps fill the batches)
        grads = torch.cat([
            _summed(model, x[i:i + 1], base[i:i + 1], diff[i:i + 1], _rows_of(fixed, slice(i, i + 1)), a, w, rows,
                    progress, f"integrated gradients {i + 1}/{num}" if num > 1 else None)
            for i, (a, w) in enumerate(rules)])
    else:
        alphas, weights = quadrature(steps, method)
        grads = _summed(model, x, base, diff, fixed, alphas, weights, rows, progress, None)
    attributions = diff.unsqueeze(1) * grads
    if not return_error:
        return attributions
    delta = (scores - base_scores).detach()
    error = (attributions.flatten(2).sum(2) - delta).abs()
    relative = torch.where(delta != 0, error / delta.abs().clamp_min(torch.finfo(delta.dtype).tiny),
                           torch.where(error > 0, torch.full_like(error, float("inf")), torch.zeros_like(error)))
    return IntegratedGradientsResult(attributions=attributions, error=error, relative_error=relative,
                                     scores=scores.detach(), baseline_scores=base_scores.detach(),
                                     targets=idx if isinstance(fixed, torch.Tensor) else None)


def _rows_of(fixed: torch.Tensor | Callable, rows: torch.Tensor | slice) -> torch.Tensor | Callable:
    """The pinned target of some images (a score callable applies to any rows as it is)."""
    return fixed[rows] if isinstance(fixed, torch.Tensor | OutputTarget) else fixed


def _summed(model: nn.Module, x: torch.Tensor, base: torch.Tensor, diff: torch.Tensor,
            fixed: torch.Tensor | Callable, alphas: torch.Tensor, weights: torch.Tensor, rows: int,
            progress: bool | None, desc: str | None) -> torch.Tensor:
    """``sum_s w_s dF/dx (x' + a_s (x - x'))``: ``N x K x C x H x W`` (:func:`summed_input_gradient`)."""
    a = alphas.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * x.dim()))

    def path_points(s0: int, s1: int) -> torch.Tensor:
        return base + a[s0:s1] * diff  # (s1 - s0) x N x C x H x W

    return summed_input_gradient(model, x, fixed, len(alphas), path_points, weights=weights, batch_size=rows,
                                 progress=progress, desc=desc or "integrated gradients")


def _refined(model: nn.Module, base: torch.Tensor, diff: torch.Tensor, fixed: torch.Tensor | Callable,
             delta: torch.Tensor, steps: int, rows: int, progress: bool | None) -> torch.Tensor:
    """The ``"adaptive"`` rule (module docstring): ``sum_s w_s dF/dx (x' + a_s (x - x'))``, ``N x K x C x H x W``,
    trapezoid weights on each image's refined grid. Images run in groups within :data:`STORE_BYTES`."""
    num = base.shape[0]
    idx = pinned_indices(fixed)
    k = 1 if idx is None else idx.shape[1]
    per_image = steps * k * diff[0].numel() * diff.element_size()
    group = max(1, min(num, STORE_BYTES // max(1, per_image)))
    scale = delta.detach().abs().to(torch.float64).cpu()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # targets whose score does not move: absolute
    out: list[torch.Tensor] = []
    with progress_bar(total=steps * num, desc="integrated gradients", unit="step", progress=progress,
                      leave=False) as bar:
        for i0 in range(0, num, group):
            ids = list(range(i0, min(num, i0 + group)))
            grid = {i: torch.linspace(0, 1, min(steps, REFINE_START), dtype=torch.float64) for i in ids}
            found = _path_points(model, base, diff, fixed, grid, rows)
            bar.update(sum(len(a) for a in grid.values()))
            while len(grid[ids[0]]) < steps:
                new: dict[int, torch.Tensor] = {}
                for i in ids:
                    a, (f, g, _) = grid[i], found[i]
                    worst = (segment_residuals(a, f, g).abs() / scale[i]).sum(1)
                    pick = worst.topk(min(REFINE_ROUND, steps - len(a), len(worst))).indices
                    new[i] = (a[pick] + a[pick + 1]) / 2
                more = _path_points(model, base, diff, fixed, new, rows)  # one round of every image: shared passes
                for i in ids:
                    a = torch.cat([grid[i], new[i]])
                    order = a.argsort()
                    grid[i] = a[order]
                    found[i] = tuple(torch.cat([old, add])[order] for old, add in zip(found[i], more[i]))
                bar.update(sum(len(a) for a in new.values()))
            for i in ids:
                a = grid[i]
                h = a[1:] - a[:-1]
                w = torch.zeros_like(a)
                w[:-1] += h / 2
                w[1:] += h / 2
                grad = found[i][2]
                out.append((w.to(grad).reshape(-1, *([1] * (grad.dim() - 1))) * grad).sum(0, keepdim=True))
    return torch.cat(out)


def _path_points(model: nn.Module, base: torch.Tensor, diff: torch.Tensor, fixed: torch.Tensor | Callable,
                 points: dict[int, torch.Tensor], rows: int) -> dict[int, tuple[torch.Tensor, ...]]:
    """At the path points ``points[i]`` of each image ``i`` (all images' points in shared passes of at most
    ``rows`` rows), per image: the target scores ``P x K`` and path derivatives ``P x K`` (float64, CPU), and the
    input gradients ``P x K x C x H x W``."""
    image = torch.cat([torch.full((len(a),), i, dtype=torch.long) for i, a in points.items()])
    alpha = torch.cat(list(points.values())).to(device=base.device, dtype=base.dtype)
    idx = pinned_indices(fixed)
    per = max(1, rows // (1 if idx is None else idx.shape[1]))
    fs, gs, grads = [], [], []
    for r0 in range(0, len(image), per):
        im = image[r0:r0 + per].to(base.device)
        d = diff[im]
        pts = base[im] + alpha[r0:r0 + per].reshape(-1, *([1] * (base.dim() - 1))) * d
        res = input_gradient(model, pts, _rows_of(fixed, im))
        grads.append(res.grads.detach())
        fs.append(res.scores.detach().to("cpu", torch.float64))
        gs.append((res.grads * d.unsqueeze(1)).flatten(2).sum(2).detach().to("cpu", torch.float64))
    f, g, grad = torch.cat(fs), torch.cat(gs), torch.cat(grads)
    out: dict[int, tuple[torch.Tensor, ...]] = {}
    start = 0
    for i, a in points.items():
        out[i] = (f[start:start + len(a)], g[start:start + len(a)], grad[start:start + len(a)])
        start += len(a)
    return out


def _path_scores(model: nn.Module, base: torch.Tensor, diff: torch.Tensor, fixed: torch.Tensor | Callable,
                 samples: int, rows: int, progress: bool | None) -> torch.Tensor:
    """Target scores ``(M + 1) x N x K`` at ``t_j = j / M`` on the path, forward passes only, at most ``rows`` rows
    (point ``j`` of image ``i``) a pass; rows 0 and M (the baseline and the image) are left zero for the caller,
    who has them already."""
    num = base.shape[0]
    t = torch.linspace(0, 1, samples + 1, dtype=torch.float64).to(device=base.device, dtype=base.dtype)
    total = (samples - 1) * num
    found: list[torch.Tensor] = []
    with torch.no_grad(), preserved_state(model), progress_bar(
            total=total, desc="integrated gradients: path scores", unit="point", progress=progress,
            leave=False) as bar:
        for r0 in range(0, total, rows):
            r = torch.arange(r0, min(total, r0 + rows), device=base.device)
            j, i = r // num + 1, r % num  # point-major: point j of every image, then point j + 1
            out = model(base[i] + t[j].reshape(-1, *([1] * (base.dim() - 1))) * diff[i])
            found.append(target_scores(out, _rows_of(fixed, i))[0])
            bar.update(len(r))
    k = found[0].shape[1] if found else 1
    inner = torch.cat(found).reshape(samples - 1, num, k) if found else base.new_zeros(0, num, k)
    ends = base.new_zeros(1, num, k)
    return torch.cat([ends, inner, ends])


def _baseline(model: nn.Module, x: torch.Tensor, baseline: Baseline) -> torch.Tensor:
    """The baseline as an ``x``-shaped tensor (a broadcast view) in the model's input space."""
    if isinstance(baseline, torch.Tensor):
        try:
            return baseline.detach().to(device=x.device, dtype=x.dtype).expand_as(x)
        except RuntimeError:
            raise ConvscopeError(f"integrated_gradients(baseline=tensor of shape {tuple(baseline.shape)}): it must "
                                 f"broadcast to the images' shape {tuple(x.shape)}") from None
    if baseline is None:
        return torch.zeros_like(x[:1]).expand_as(x)
    if isinstance(baseline, bool) or not isinstance(baseline, int | float):
        raise ConvscopeError(f"integrated_gradients(baseline={baseline!r}): use None (zeros), a grey level in "
                             "[0, 1] (0.0 is black) or a tensor in the model's input space")
    grey = torch.full((1, *x.shape[1:]), float(baseline), dtype=x.dtype, device=x.device)
    try:
        return input_normalizer(model)(grey).to(dtype=x.dtype).expand_as(x)
    except RuntimeError:
        raise ConvscopeError(f"integrated_gradients(baseline={baseline!r}): the model's normalization does not fit "
                             f"images of shape {tuple(x.shape[1:])}; pass the baseline as a tensor") from None
