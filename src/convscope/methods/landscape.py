"""The loss landscape around a trained network (Li, Xu, Taylor, Studer & Goldstein 2018, "Visualizing the loss
landscape of neural nets").

:func:`loss_landscape` evaluates ``L(theta + alpha delta)`` (1-D) or ``L(theta + alpha delta + beta eta)`` (2-D) on a
grid of ``alpha, beta`` in ``[-span, span]``, where ``delta, eta`` are random Gaussian directions, *filter-normalized*
(Sec. 4): each filter ``d_{i,j}`` of a direction (an output channel of a convolution, an output neuron of a linear
layer: a slice along the first dimension of every parameter with two or more dimensions) is rescaled to the norm of
the corresponding filter of the weights, ``d_{i,j} <- d_{i,j} / |d_{i,j}| * |theta_{i,j}|``, which removes the scale
invariance of ReLU networks from the picture. Biases and batch-norm parameters (every parameter with one dimension)
get a zero direction, as in the paper ("we do not perturb bias and BN parameters"; their code's ``ignore='biasbn'``).
Buffers (batch-norm running statistics) are never perturbed.

:func:`interpolate` evaluates the straight path ``(1 - alpha) theta_a + alpha theta_b`` between two checkpoints
(Goodfellow et al. 2015, Li et al. Sec. 3): every floating-point entry of the state dict (parameters and running
statistics) is interpolated; ``alpha = 0`` and ``1`` give the two checkpoints exactly.

The loss is evaluated with the model in **eval mode** (dropout off, batch norm with its running statistics) and
without gradients, over ``(x, y)`` in batches, as the mean over all examples (``loss`` must return the batch mean,
as ``F.cross_entropy`` does). The model's parameters and buffers are saved before and copied back afterwards
(``copy_`` into the same tensors), bit for bit, also when the loss raises, on ``KeyboardInterrupt`` and on any
other exception; train/eval flags and ``requires_grad`` are restored too.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.model import model_device
from ..core.probe import preserved_state
from ..core.progress import progress_bar
from ..errors import ConvscopeError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Direction = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LandscapeResult:
    """Losses on a grid around the weights (Li et al. 2018).

    ``alphas``: the ``steps`` coordinates along the first direction; ``betas``: along the second (2-D) or None;
    ``losses``: ``steps`` (1-D) or ``steps x steps`` with ``losses[i, j]`` at ``(alphas[i], betas[j])``, float64;
    ``directions``: the directions used (``{parameter name: tensor}`` each, on the model's device).
    """

    alphas: torch.Tensor
    betas: torch.Tensor | None
    losses: torch.Tensor
    directions: list[Direction]
    span: float

    @property
    def dims(self) -> int:
        return 1 if self.betas is None else 2

    @property
    def origin_loss(self) -> float | None:
        """The loss at the weights themselves, when the grid has the origin (an odd number of steps)."""
        i = (self.alphas == 0).nonzero().flatten()
        if not len(i):
            return None
        if self.betas is None:
            return float(self.losses[i[0]])
        j = (self.betas == 0).nonzero().flatten()
        return float(self.losses[i[0], j[0]]) if len(j) else None

    @property
    def nonfinite(self) -> int:
        """Grid points where the loss overflowed (inf / NaN): counted, never hidden."""
        return int((~torch.isfinite(self.losses)).sum())


@dataclass(frozen=True)
class InterpolationResult:
    """Losses along ``(1 - alpha) theta_a + alpha theta_b``: ``alphas`` and ``losses`` (``steps`` each)."""

    alphas: torch.Tensor
    losses: torch.Tensor


# --------------------------------------------------------------------------- directions


def filter_normalize(direction: Mapping[str, torch.Tensor], model: nn.Module) -> Direction:
    """Li et al. 2018 Sec. 4: each filter of ``direction`` rescaled to the norm of the model's filter (parameters with
    two or more dimensions, filters along dim 0), and a zero direction for one-dimensional parameters (biases,
    batch-norm weights and biases). Returns a new dict."""
    params = dict(model.named_parameters())
    check_direction(direction, params)
    out: Direction = {}
    for name, d in direction.items():
        w = params[name].detach()
        d = d.detach().to(w.device, torch.float64)
        if w.dim() <= 1:
            out[name] = torch.zeros_like(w)
            continue
        wn = w.double().flatten(1).norm(dim=1)
        dn = d.flatten(1).norm(dim=1)
        scale = wn / (dn + 1e-10)  # the paper's code: d * |w| / (|d| + 1e-10)
        out[name] = (d * scale.view(-1, *[1] * (d.dim() - 1))).to(w.dtype)
    return out


def random_direction(model: nn.Module, seed: int = 0) -> Direction:
    """A Gaussian direction over the model's parameters (drawn on the CPU from ``seed``, so it is the same on any
    device), filter-normalized (:func:`filter_normalize`)."""
    gen = torch.Generator().manual_seed(int(seed))
    raw = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in model.named_parameters()}
    return filter_normalize(raw, model)


def check_direction(direction: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> None:
    """A ConvscopeError unless ``direction`` has a tensor of the right shape for every parameter and nothing else."""
    if not isinstance(direction, Mapping):
        raise ConvscopeError(f"a direction must be a dict {{parameter name: tensor}}, got {type(direction).__name__}; "
                             "use random_direction(model)")
    missing = [n for n in params if n not in direction]
    extra = [n for n in direction if n not in params]
    if missing or extra:
        what = f"no entry for parameter {missing[0]!r}" if missing else f"an unknown parameter {extra[0]!r}"
        raise ConvscopeError(f"the direction has {what}; give one tensor per name in model.named_parameters() "
                             "(random_direction(model) makes one)")
    for n, p in params.items():
        d = direction[n]
        if not isinstance(d, torch.Tensor) or d.shape != p.shape:
            raise ConvscopeError(f"direction[{n!r}] has shape {tuple(getattr(d, 'shape', ()))}, the parameter "
                                 f"{tuple(p.shape)}; give tensors shaped like the parameters")
        if not torch.isfinite(d).all():
            raise ConvscopeError(f"direction[{n!r}] has inf or NaN values; give finite directions")


# --------------------------------------------------------------------------- weights restored bit for bit


@contextlib.contextmanager
def restored_weights(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Eval mode, frozen parameters, and every state-dict entry (parameters and buffers) copied back into the same
    tensors on exit, bit for bit, whatever ends the block (an exception, ``KeyboardInterrupt``). Yields the model's
    live state dict (``{name: tensor sharing the storage}``) to write into."""
    live = model.state_dict(keep_vars=True)
    saved = {k: v.detach().clone() for k, v in live.items() if isinstance(v, torch.Tensor)}
    with preserved_state(model, eval_mode=True, freeze=True):
        try:
            yield {k: v.detach() for k, v in live.items() if isinstance(v, torch.Tensor)}
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    live[k].detach().copy_(v)


def dataset_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: LossFn = F.cross_entropy,
                 batch_size: int = 256) -> float:
    """The mean of ``loss(model(x_batch), y_batch)`` over all examples (each batch weighted by its size), without
    gradients, in the mode the model is in."""
    dev = model_device(model)
    total = 0.0
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            xb, yb = x[s:s + batch_size].to(dev), y[s:s + batch_size].to(dev)
            value = loss(model(xb), yb)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise ConvscopeError(f"loss returned {type(value).__name__} {tuple(getattr(value, 'shape', ()))}; "
                                     "it must return the mean loss of the batch as a scalar (e.g. F.cross_entropy)")
            total += float(value) * len(xb)
    return total / len(x)


def _check_data(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2 or len(x) == 0:
        raise ConvscopeError(f"x must be a non-empty float tensor of inputs N x ..., got {type(x).__name__} "
                             f"{tuple(getattr(x, 'shape', ()))}")
    if not isinstance(y, torch.Tensor) or len(y) != len(x):
        raise ConvscopeError(f"y must be a tensor of {len(x)} targets (one per input), got "
                             f"{type(y).__name__} {tuple(getattr(y, 'shape', ()))}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConvscopeError(f"batch_size={batch_size!r}: use a positive int")


def _check_steps(steps: int, least: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < least:
        raise ConvscopeError(f"steps={steps!r}: give an int of at least {least} (odd, e.g. 21, puts the weights "
                             "themselves on the grid)")


# --------------------------------------------------------------------------- the landscape


def loss_landscape(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dims: int = 1, steps: int = 21,
                   span: float = 1.0, directions: Sequence[Mapping[str, torch.Tensor]] | None = None, seed: int = 0,
                   loss: LossFn = F.cross_entropy, batch_size: int = 256,
                   progress: bool | None = None) -> LandscapeResult:
    """The loss around the model's weights along ``dims`` (1 or 2) filter-normalized random directions (Li et al.
    2018, Sec. 4), on ``steps`` (per axis) coordinates evenly spaced in ``[-span, span]``.

    Args:
        x, y: inputs ``N x ...`` and targets; evaluated ``batch_size`` at a time, in eval mode, without gradients.
        directions: ``dims`` dicts ``{parameter name: tensor}`` used as they are (e.g. from :func:`random_direction`
            or PCA of a training trajectory); default: random directions from ``seed`` (``seed``, ``seed + 1``).
        loss: ``loss(outputs, y)`` returning the batch mean (default ``F.cross_entropy``).
        progress: a progress bar over the grid points (``True``, ``False``, ``None``: once it has run 2 s).

    The weights are restored bit for bit afterwards, whatever happens (see the module docstring).
    """
    if dims not in (1, 2) or isinstance(dims, bool):
        raise ConvscopeError(f"dims={dims!r}: use 1 (a curve) or 2 (a surface)")
    _check_steps(steps, 2)
    if isinstance(span, bool) or not isinstance(span, int | float) or not math.isfinite(span) or span <= 0:
        raise ConvscopeError(f"span={span!r}: give a positive number (the grid covers -span .. span)")
    _check_data(x, y, batch_size)
    params = dict(model.named_parameters())
    if not params:
        raise ConvscopeError(f"{type(model).__name__} has no parameters: there is no landscape to draw")
    if directions is None:
        dirs = [random_direction(model, seed + k) for k in range(dims)]
    else:
        given = list(directions)
        if len(given) != dims:
            raise ConvscopeError(f"dims={dims} needs {dims} direction(s), got {len(given)}; give one dict per axis")
        for d in given:
            check_direction(d, params)
        dirs = [{n: d[n].detach().to(p.device, p.dtype, copy=True) for n, p in params.items()} for d in given]
    coords = torch.linspace(-span, span, steps, dtype=torch.float64)
    coords[(coords.abs() < 1e-12 * span)] = 0.0  # the origin exactly where the grid has it
    points = [(float(a),) for a in coords] if dims == 1 else [(float(a), float(b)) for a in coords for b in coords]
    losses = torch.empty(len(points), dtype=torch.float64)
    with restored_weights(model) as live:
        origin = {n: live[n].clone() for n in params}
        with torch.no_grad():
            for k, point in enumerate(progress_bar(points, desc="landscape", unit="point", progress=progress)):
                for n in params:
                    w = origin[n]
                    for c, d in zip(point, dirs):
                        w = w + c * d[n]
                    live[n].copy_(w)
                losses[k] = dataset_loss(model, x, y, loss, batch_size)
    shape = (steps,) if dims == 1 else (steps, steps)
    return LandscapeResult(coords, coords.clone() if dims == 2 else None, losses.view(shape), dirs, float(span))


def _state_of(state: Mapping[str, torch.Tensor] | nn.Module, model: nn.Module, what: str) -> dict[str, torch.Tensor]:
    from ..models.zoo import state_mismatch  # local: the zoo imports many modules

    if isinstance(state, nn.Module):
        state = state.state_dict()  # may be the model itself: interpolate() copies the end points
    if not isinstance(state, Mapping):
        raise ConvscopeError(f"{what} must be a state dict or a model, got {type(state).__name__}; load a checkpoint "
                             "with torch.load(path)['state_dict'] or pass the model")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    problem = state_mismatch(model, state)
    if problem:
        raise ConvscopeError(f"{what} does not fit {type(model).__name__}: {problem}; give a checkpoint of the same "
                             "architecture")
    return state


def interpolate(model: nn.Module, state_a: Mapping[str, torch.Tensor] | nn.Module,
                state_b: Mapping[str, torch.Tensor] | nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 21,
                extent: tuple[float, float] = (0.0, 1.0), loss: LossFn = F.cross_entropy, batch_size: int = 256,
                progress: bool | None = None) -> InterpolationResult:
    """The loss along the straight line ``(1 - alpha) theta_a + alpha theta_b`` between two checkpoints of
    ``model``'s architecture (Goodfellow et al. 2015; Li et al. 2018 Sec. 3), ``alpha`` on ``steps`` points from
    ``extent[0]`` to ``extent[1]`` (e.g. ``(-0.5, 1.5)`` as in Li et al. Fig. 2).

    Every floating-point state entry (parameters, batch-norm running statistics) is interpolated; integer buffers
    keep the model's own values. ``model`` only lends its architecture: its weights are restored bit for bit.
    """
    _check_steps(steps, 2)
    _check_data(x, y, batch_size)
    try:
        lo, hi = (float(v) for v in extent)
    except (TypeError, ValueError):
        lo = hi = math.nan
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ConvscopeError(f"extent={extent!r}: give (start, end) with start < end, e.g. (0.0, 1.0)")
    a = _state_of(state_a, model, "state_a")
    b = _state_of(state_b, model, "state_b")
    alphas = torch.linspace(lo, hi, steps, dtype=torch.float64)
    alphas[alphas.abs() < 1e-12] = 0.0
    alphas[(alphas - 1).abs() < 1e-12] = 1.0
    losses = torch.empty(steps, dtype=torch.float64)
    with restored_weights(model) as live:
        names = [k for k, v in live.items() if v.is_floating_point()]
        ends = {k: (a[k].detach().to(live[k], copy=True), b[k].detach().to(live[k], copy=True)) for k in names}
        with torch.no_grad():
            for i, alpha in enumerate(progress_bar(alphas.tolist(), desc="interpolate", unit="point",
                                                   progress=progress)):
                for k in names:
                    wa, wb = ends[k]
                    live[k].copy_((1 - alpha) * wa + alpha * wb)
                losses[i] = dataset_loss(model, x, y, loss, batch_size)
    return InterpolationResult(alphas, losses)


__all__ = ["Direction", "InterpolationResult", "LandscapeResult", "LossFn", "check_direction", "dataset_loss",
           "filter_normalize", "interpolate", "loss_landscape", "random_direction", "restored_weights"]
