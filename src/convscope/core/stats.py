"""Resampling statistics shared by the evaluations (attribution benchmark, Net2Vec baselines)."""

from __future__ import annotations

import torch

__all__ = ["bootstrap_weights"]


def bootstrap_weights(n: int, resamples: int, seed: int = 0) -> torch.Tensor:
    """``resamples x n`` float64 counts: how often each of ``n`` items is drawn in each bootstrap resample (draws
    with replacement, seeded), so a resampled sum is ``weights @ values`` (Efron 1979)."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(n, (resamples, n), generator=gen)
    return torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(resamples, n, dtype=torch.float64))
