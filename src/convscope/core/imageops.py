"""Small differentiable image operations shared by methods: Gaussian blur, ranks.

``gaussian_blur`` serves the insertion metric's blurred baseline (Petsiuk et al. 2018) and the blur regularizer of
activation maximization (Yosinski et al. 2015); ``rank_average`` serves Spearman correlations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConvscopeError


def gaussian_kernel1d(sigma: float, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                      truncate: float = 3.0) -> torch.Tensor:
    """Normalized 1-D Gaussian ``exp(-t^2 / (2 sigma^2))`` on ``t = -r..r``, ``r = ceil(truncate * sigma)``."""
    if not sigma > 0:
        raise ConvscopeError(f"Gaussian blur needs sigma > 0, got {sigma}")
    r = max(1, math.ceil(truncate * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = 3.0) -> torch.Tensor:
    """Separable Gaussian blur of ``N x C x H x W`` (or ``C x H x W``) per channel, reflect-padded edges.

    Differentiable; ``sigma`` in pixels.
    """
    if x.dim() == 3:
        return gaussian_blur(x[None], sigma, truncate)[0]
    if x.dim() != 4:
        raise ConvscopeError(f"gaussian_blur expects N x C x H x W, got {tuple(x.shape)}")
    k = gaussian_kernel1d(sigma, x.dtype, x.device, truncate)
    r = (k.numel() - 1) // 2
    c = x.shape[1]
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    y = F.pad(x, (r, r, 0, 0), mode=mode)
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.pad(y, (0, 0, r, r), mode=mode)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def rank_average(v: torch.Tensor) -> torch.Tensor:
    """Ranks ``0..n-1`` along the last dimension, ties sharing their average rank (as ``scipy.stats.rankdata``
    minus one)."""
    flat = v.reshape(-1, v.shape[-1])
    out = torch.empty_like(flat, dtype=torch.float64)
    for i, row in enumerate(flat):
        sorted_v, order = torch.sort(row, stable=True)
        _, inverse, counts = torch.unique_consecutive(sorted_v, return_inverse=True, return_counts=True)
        start = torch.cumsum(counts, 0) - counts
        avg = start.double() + (counts.double() - 1) / 2
        out[i, order] = avg[inverse]
    return out.reshape(v.shape)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of ``a`` and ``b`` along the last dimension (Pearson correlation of average
    ranks); ``nan`` where either is constant."""
    if a.shape != b.shape:
        raise ConvscopeError(f"spearman: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    ra, rb = rank_average(a), rank_average(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    den = ra.norm(dim=-1) * rb.norm(dim=-1)
    return torch.where(den > 0, (ra * rb).sum(-1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))
