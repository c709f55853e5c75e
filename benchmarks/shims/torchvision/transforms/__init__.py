"""``Compose``, ``Normalize``, ``ToTensor``, ``Resize`` (the classes grad-cam and lucent import)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from . import functional  # noqa: F401
from .functional import normalize, resize, to_tensor


class Compose:
    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: object) -> object:
        for t in self.transforms:
            x = t(x)
        return x


class Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float], inplace: bool = False) -> None:
        super().__init__()
        self.mean, self.std, self.inplace = list(mean), list(std), inplace

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return normalize(t, self.mean, self.std, self.inplace)


class ToTensor:
    def __call__(self, pic: object) -> torch.Tensor:
        return to_tensor(pic)


class Resize(nn.Module):
    def __init__(self, size: int | Sequence[int], interpolation: object = None, max_size: int | None = None,
                 antialias: bool | None = True) -> None:
        super().__init__()
        self.size, self.antialias = size, antialias

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return resize(t, self.size, antialias=self.antialias)
