"""MobileNetV3-Large (Howard et al. 2019, "Searching for MobileNetV3", Table 1) with torchvision's module names,
so a state dict saved from ``torchvision.models.mobilenet_v3_large()`` loads strictly.

Names: ``features.0`` (stem: ``.0`` conv 3x3/2, ``.1`` BN, ``.2`` Hardswish), ``features.1`` .. ``features.15``
(inverted residual blocks: ``features.N.block.M`` = [1x1 expand conv-BN-act unless the expansion is 1], depthwise
conv-BN-act, [squeeze-excitation ``fc1``/``fc2`` with ReLU ``activation`` and Hardsigmoid ``scale_activation``],
1x1 projection conv-BN without activation), ``features.16`` (1x1 conv to 960, BN, Hardswish), ``avgpool``,
``classifier.{0: Linear 960->1280, 1: Hardswish, 2: Dropout(0.2), 3: Linear}``. BatchNorm uses eps 1e-3 and
momentum 0.01, as torchvision. A block adds its input back when its stride is 1 and its width is unchanged;
torchvision adds in place, here out of place (same numbers; a hooked projection-BN output stays intact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.01


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to the nearest multiple of ``divisor``, never more than 10% down."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


@dataclass(frozen=True)
class BlockSpec:
    """One row of Table 1: input width, kernel, expanded width, output width, SE, Hardswish (else ReLU), stride."""

    cin: int
    kernel: int
    expanded: int
    cout: int
    use_se: bool
    use_hs: bool
    stride: int


# Howard et al. 2019, Table 1 (MobileNetV3-Large); "HS" = h-swish, "RE" = ReLU.
LARGE_BLOCKS = (
    BlockSpec(16, 3, 16, 16, False, False, 1),
    BlockSpec(16, 3, 64, 24, False, False, 2),
    BlockSpec(24, 3, 72, 24, False, False, 1),
    BlockSpec(24, 5, 72, 40, True, False, 2),
    BlockSpec(40, 5, 120, 40, True, False, 1),
    BlockSpec(40, 5, 120, 40, True, False, 1),
    BlockSpec(40, 3, 240, 80, False, True, 2),
    BlockSpec(80, 3, 200, 80, False, True, 1),
    BlockSpec(80, 3, 184, 80, False, True, 1),
    BlockSpec(80, 3, 184, 80, False, True, 1),
    BlockSpec(80, 3, 480, 112, True, True, 1),
    BlockSpec(112, 3, 672, 112, True, True, 1),
    BlockSpec(112, 5, 672, 160, True, True, 2),
    BlockSpec(160, 5, 960, 160, True, True, 1),
    BlockSpec(160, 5, 960, 160, True, True, 1),
)
LAST_CHANNEL = 1280


class ConvBNActivation(nn.Sequential):
    """``0`` conv (no bias, "same" padding), ``1`` BatchNorm, ``2`` activation (omitted when None)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 activation: type[nn.Module] | None = nn.ReLU) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel_size, stride, padding=(kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """x * hardsigmoid(fc2(relu(fc1(avgpool(x))))) (Hu et al. 2018; MobileNetV3 Sec. 5.3 uses hard-sigmoid)."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (kxk, strided), optional SE, project (1x1, linear); residual when shapes match."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        act = nn.Hardswish if spec.use_hs else nn.ReLU
        layers: list[nn.Module] = []
        if spec.expanded != spec.cin:
            layers.append(ConvBNActivation(spec.cin, spec.expanded, 1, activation=act))
        layers.append(ConvBNActivation(spec.expanded, spec.expanded, spec.kernel, spec.stride,
                                       groups=spec.expanded, activation=act))
        if spec.use_se:
            layers.append(SqueezeExcitation(spec.expanded, make_divisible(spec.expanded // 4, 8)))
        layers.append(ConvBNActivation(spec.expanded, spec.cout, 1, activation=None))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = spec.stride == 1 and spec.cin == spec.cout
        self.out_channels = spec.cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        return result + x if self.use_res_connect else result


class MobileNetV3(nn.Module):
    """Stem, inverted residual blocks, 1x1 conv to 6x the last width, global average pool, two-layer classifier."""

    def __init__(self, blocks: tuple[BlockSpec, ...] = LARGE_BLOCKS, last_channel: int = LAST_CHANNEL,
                 num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNActivation(3, blocks[0].cin, 3, 2, activation=nn.Hardswish)]
        layers += [InvertedResidual(spec) for spec in blocks]
        last_conv = 6 * blocks[-1].cout
        layers.append(ConvBNActivation(blocks[-1].cout, last_conv, 1, activation=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(last_conv, last_channel), nn.Hardswish(inplace=True), nn.Dropout(p=dropout, inplace=True),
            nn.Linear(last_channel, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v3_large(num_classes: int = 1000) -> MobileNetV3:
    """MobileNetV3-Large (width 1.0); 5,483,032 parameters with 1000 classes."""
    return MobileNetV3(LARGE_BLOCKS, LAST_CHANNEL, num_classes)
