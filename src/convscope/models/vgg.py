"""VGG-16 (Simonyan & Zisserman 2015, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
Table 1, configuration D) with torchvision's module names, so a state dict saved from
``torchvision.models.vgg16()`` loads strictly.

Names: ``features.N`` (3x3 convolutions with padding 1, each followed by an in-place ``nn.ReLU``, and 2x2/2 max
pools; convolutions at 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), ``avgpool`` (adaptive to 7x7, so inputs
of any size from 32 px work: smaller feature maps are repeated up to 7x7), ``classifier.{0,3,6}`` (fc6, fc7, fc8)
with in-place ReLUs at 1, 4 and Dropout(0.5) at 2, 5. No batch norm (that is ``vgg16_bn``).
"""

from __future__ import annotations

import torch
from torch import nn

# Table 1, column D: output channels of each 3x3 convolution, "M" = 2x2 max pool with stride 2.
VGG16_CONFIG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                       512, 512, 512, "M", 512, 512, 512, "M")


def make_features(config: tuple[int | str, ...]) -> nn.Sequential:
    """The convolutional trunk: conv3x3 + ReLU per number, max pool per "M"."""
    layers: list[nn.Module] = []
    channels = 3
    for v in config:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = int(v)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """Trunk, adaptive 7x7 average pool, three fully connected layers (4096, 4096, classes)."""

    def __init__(self, features: nn.Sequential, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(p=dropout),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg16(num_classes: int = 1000) -> VGG:
    """VGG-16 (configuration D); 138,357,544 parameters with 1000 classes."""
    return VGG(make_features(VGG16_CONFIG), num_classes)
