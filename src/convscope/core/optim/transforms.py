"""Random, differentiable image transforms applied before each forward pass: transformation robustness
(Mordvintsev et al. 2015; Olah et al. 2017). Per-image randomness from one generator per image."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConvscopeError
from .params import Generators


class Transform(nn.Module):
    """A random, differentiable image transform applied before each forward pass (per image randomness)."""

    def forward(self, x: torch.Tensor, generators: Generators) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class _Permute(torch.autograd.Function):
    """``out[n, c, k] = x[n, c, index[n, c, k]]`` for a permutation ``index`` of each row (``N x C x HW``). Its
    gradient is the inverse permutation, again a gather: no scatter-add (the backward of advanced indexing), so
    forward and backward cost one read and one write each and are exact."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index, inverse)
        return x.gather(2, index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        index, inverse = ctx.saved_tensors
        return _Permute.apply(grad, inverse, index), None, None


def _roll_index(d: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Flat source index ``N x HW`` of a per-image ``torch.roll`` by ``d = (dy, dx)`` rows: ``out[y, x] =
    in[(y - dy) % h, (x - dx) % w]``."""
    iy = (torch.arange(h, device=d.device)[None] - d[:, :1]) % h
    ix = (torch.arange(w, device=d.device)[None] - d[:, 1:]) % w
    return (iy[:, :, None] * w + ix[:, None, :]).flatten(1)


class Jitter(Transform):
    """Shift each image by a random ``(dy, dx)`` in ``[-pixels, pixels]``, wrapping around (as ``torch.roll``)."""

    def __init__(self, pixels: int) -> None:
        super().__init__()
        if not isinstance(pixels, int) or pixels < 0:
            raise ConvscopeError(f"Jitter(pixels={pixels!r}): use an int >= 0")
        self.pixels = pixels

    def forward(self, x: torch.Tensor, generators: Generators) -> torch.Tensor:
        if self.pixels == 0:
            return x
        n, c, h, w = x.shape
        d = torch.stack([torch.randint(-self.pixels, self.pixels + 1, (2,), generator=g) for g in generators])
        d = d.to(x.device)
        index = _roll_index(d, h, w)[:, None].expand(n, c, h * w)
        inverse = _roll_index(-d, h, w)[:, None].expand(n, c, h * w)
        return _Permute.apply(x.reshape(n, c, h * w), index, inverse).view(n, c, h, w)


class RandomScale(Transform):
    """Zoom each image by a factor drawn from ``scales`` (and rotate by up to ``degrees``) about its centre; output
    the same size, bilinear, reflected borders (Olah et al. 2017, "Transformation robustness")."""

    def __init__(self, scales: Sequence[float], degrees: float = 0.0) -> None:
        super().__init__()
        self.scales = tuple(float(s) for s in scales)
        if not self.scales or min(self.scales) <= 0:
            raise ConvscopeError(f"RandomScale(scales={scales!r}): give positive factors, e.g. (0.95, 1.0, 1.05)")
        self.degrees = float(degrees)

    def forward(self, x: torch.Tensor, generators: Generators) -> torch.Tensor:
        n = x.shape[0]
        idx = [int(torch.randint(len(self.scales), (1,), generator=g)) for g in generators]
        ang = [(torch.rand(1, generator=g).item() * 2 - 1) * self.degrees if self.degrees else 0.0 for g in generators]
        theta = torch.zeros(n, 2, 3, dtype=x.dtype)
        for i, (k, a) in enumerate(zip(idx, ang)):
            s, r = self.scales[k], math.radians(a)
            theta[i, 0, 0], theta[i, 0, 1] = math.cos(r) / s, -math.sin(r) / s
            theta[i, 1, 0], theta[i, 1, 1] = math.sin(r) / s, math.cos(r) / s
        grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

