"""ConvNeXt-Tiny (Liu et al. 2022, "A ConvNet for the 2020s", Sec. 2-3, Fig. 4) with torchvision's module names,
so a state dict saved from ``torchvision.models.convnext_tiny()`` loads strictly.

Names: ``features.0`` (stem: ``.0`` 4x4/4 conv, ``.1`` LayerNorm2d), ``features.1/3/5/7`` (stages of 3, 3, 9, 3
blocks at widths 96, 192, 384, 768), ``features.2/4/6`` (downsampling: ``.0`` LayerNorm2d, ``.1`` 2x2/2 conv),
``avgpool``, ``classifier.{0: LayerNorm2d, 1: Flatten, 2: Linear}``. A block ``features.S.B`` is
``block.{0: 7x7 depthwise conv, 1: permute to channels-last, 2: LayerNorm, 3: Linear 4x, 4: GELU, 5: Linear,
6: permute back}``, a ``layer_scale`` parameter (C x 1 x 1, initialised to 1e-6) and ``stochastic_depth``
(drop probability rising linearly from 0 to 0.1 over the 18 blocks; the identity in eval mode). Every LayerNorm
uses eps 1e-6; LayerNorm2d normalises over channels at each pixel. torchvision adds the block input in place,
here out of place (same numbers; a hooked ``stochastic_depth`` output stays intact).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6
TINY_STAGES = ((96, 3), (192, 3), (384, 9), (768, 3))  # (width, blocks) per stage
TINY_STOCHASTIC_DEPTH = 0.1
LAYER_SCALE_INIT = 1e-6


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an ``N x C x H x W`` map, at each pixel (channels-first input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    """``torch.permute`` as a module (channels-first <-> channels-last inside a block)."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = list(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class StochasticDepth(nn.Module):
    """Drop a residual branch per sample with probability ``p`` while training (Huang et al. 2016, "row" mode:
    the survivors are scaled by 1 / (1 - p)); the identity in eval mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        noise = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        noise = noise.bernoulli_(survival)
        return x * (noise / survival if survival > 0.0 else noise)

    def extra_repr(self) -> str:
        return f"p={self.p}, mode=row"


class CNBlock(nn.Module):
    """x + drop_path(gamma * pwconv2(GELU(pwconv1(LN(dwconv7x7(x)))))) (Liu et al. 2022, Fig. 4, right)."""

    def __init__(self, dim: int, layer_scale: float = LAYER_SCALE_INIT, stochastic_depth_prob: float = 0.0) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=LN_EPS),
            nn.Linear(dim, 4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(4 * dim, dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stochastic_depth(self.layer_scale * self.block(x)) + x


class ConvNeXt(nn.Module):
    """Patchify stem, four stages with LayerNorm + 2x2/2 conv downsampling between them, global average pool,
    LayerNorm, linear classifier (adaptive pooling: any input of at least 32 px)."""

    def __init__(self, stages: tuple[tuple[int, int], ...] = TINY_STAGES,
                 stochastic_depth_prob: float = TINY_STOCHASTIC_DEPTH, layer_scale: float = LAYER_SCALE_INIT,
                 num_classes: int = 1000) -> None:
        super().__init__()
        first = stages[0][0]
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, first, kernel_size=4, stride=4, padding=0, bias=True),
                                                 LayerNorm2d(first, eps=LN_EPS))]
        total = sum(n for _, n in stages)
        index = 0
        for s, (dim, n) in enumerate(stages):
            blocks = []
            for _ in range(n):
                blocks.append(CNBlock(dim, layer_scale, stochastic_depth_prob * index / (total - 1.0)))
                index += 1
            layers.append(nn.Sequential(*blocks))
            if s + 1 < len(stages):
                nxt = stages[s + 1][0]
                layers.append(nn.Sequential(LayerNorm2d(dim, eps=LN_EPS), nn.Conv2d(dim, nxt, kernel_size=2, stride=2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last = stages[-1][0]
        self.classifier = nn.Sequential(LayerNorm2d(last, eps=LN_EPS), nn.Flatten(1), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


def convnext_tiny(num_classes: int = 1000) -> ConvNeXt:
    """ConvNeXt-Tiny; 28,589,128 parameters with 1000 classes."""
    return ConvNeXt(TINY_STAGES, TINY_STOCHASTIC_DEPTH, LAYER_SCALE_INIT, num_classes)
