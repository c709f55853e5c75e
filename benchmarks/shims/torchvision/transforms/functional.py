"""``normalize``, ``resize``, ``to_tensor`` in pure PyTorch (tensor inputs; PIL/numpy for to_tensor)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def normalize(t: torch.Tensor, mean: Sequence[float], std: Sequence[float], inplace: bool = False) -> torch.Tensor:
    mean_t = torch.as_tensor(mean, dtype=t.dtype, device=t.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=t.dtype, device=t.device).view(-1, 1, 1)
    return t.sub_(mean_t).div_(std_t) if inplace else (t - mean_t) / std_t


def resize(t: torch.Tensor, size: int | Sequence[int], interpolation: object = None, max_size: int | None = None,
           antialias: bool | None = True) -> torch.Tensor:
    h, w = t.shape[-2:]
    if isinstance(size, int) or len(size) == 1:
        s = size if isinstance(size, int) else size[0]
        size = (s, round(w * s / h)) if h <= w else (round(h * s / w), s)
    x = t if t.dim() == 4 else t.unsqueeze(0)
    out = F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=bool(antialias))
    return out if t.dim() == 4 else out[0]


def to_tensor(pic: object) -> torch.Tensor:
    a = np.asarray(pic)
    if a.ndim == 2:
        a = a[:, :, None]
    t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
    return t.float().div(255) if t.dtype == torch.uint8 else t.float()
