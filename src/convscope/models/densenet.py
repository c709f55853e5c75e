"""DenseNet-121 (Huang et al. 2017, "Densely Connected Convolutional Networks", Table 1, DenseNet-BC with k = 32)
with torchvision's module names, so a state dict saved from ``torchvision.models.densenet121()`` loads strictly.

Names: ``features.{conv0, norm0, relu0, pool0}``, ``features.denseblockB.denselayerL.{norm1, relu1, conv1, norm2,
relu2, conv2}`` (B = 1..4 with 6, 12, 24, 16 layers), ``features.transitionT.{norm, relu, conv, pool}``,
``features.norm5``, ``classifier``. Layer l of a block sees the concatenation [x0, x1, ..., x_{l-1}] of the block
input and every earlier layer's k new maps (Eq. 2); the block returns the concatenation of all of them. After
``norm5`` the forward pass applies a functional ReLU (no module: hook ``features.norm5`` for the pre-ReLU maps),
an adaptive average pool to 1x1 and the classifier. BatchNorm keeps PyTorch's defaults (eps 1e-5, momentum 0.1).
torchvision's final ReLU is in place; here it is out of place (same numbers; a hooked ``norm5`` output stays intact).

:func:`rename_legacy_keys` maps the keys of torchvision's original checkpoint files (``norm.1``, ``conv.2`` from
before module names could not hold dots) onto these names, as torchvision does when it loads them.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$")


class DenseLayer(nn.Module):
    """BN-ReLU-Conv(1x1, 4k) then BN-ReLU-Conv(3x3, k) on the concatenated inputs (Sec. 3, "Bottleneck layers")."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, inputs: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        x = torch.cat([inputs] if isinstance(inputs, torch.Tensor) else list(inputs), 1)
        bottleneck = self.conv1(self.relu1(self.norm1(x)))
        new_features = self.conv2(self.relu2(self.norm2(bottleneck)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; returns [x0, x1, ..., x_L] concatenated along channels (Eq. 2)."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        for i in range(num_layers):
            self[f"denselayer{i + 1}"] = DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size,
                                                    drop_rate)

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN, ReLU, 1x1 convolution halving the channels (compression 0.5), 2x2 average pool (Sec. 3)."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__(OrderedDict([
            ("norm", nn.BatchNorm2d(num_input_features)),
            ("relu", nn.ReLU(inplace=True)),
            ("conv", nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)),
            ("pool", nn.AvgPool2d(kernel_size=2, stride=2)),
        ]))


class DenseNet(nn.Module):
    """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool), dense blocks joined by transitions, final BN, classifier."""

    def __init__(self, growth_rate: int = 32, block_config: tuple[int, ...] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0,
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}",
                                     DenseBlock(num_layers, channels, bn_size, growth_rate, drop_rate))
            channels += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(channels, channels // 2))
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x))
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


def densenet121(num_classes: int = 1000) -> DenseNet:
    """DenseNet-121: k = 32, blocks (6, 12, 24, 16), 64 stem channels; 7,978,856 parameters with 1000 classes."""
    return DenseNet(32, (6, 12, 24, 16), 64, num_classes=num_classes)


def rename_legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``...denselayer3.norm.1.weight`` -> ``...denselayer3.norm1.weight`` (torchvision's original checkpoints)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        found = LEGACY_KEY.match(key)
        out[found.group(1) + found.group(2) if found else key] = value
    return out
