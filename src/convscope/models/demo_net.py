"""``demo_net``: the project's own classic CaffeNet/ZFNet-style network (Krizhevsky et al. 2012; Zeiler & Fergus 2014).

Five convolutions with ReLU, max pooling and local response normalization, then three fully connected layers.
At 112x112: conv1 64x56x56 -> pool1 28x28 -> conv2 (stride 2) 128x14x14 -> conv3..5 at 14x14 -> pool5 128x7x7.
Every operation is its own named module (``features.conv1`` ... ``features.pool5``, ``classifier.fc6`` ...
``classifier.fc8``), so the DeconvNet's exact classic path (conv / ReLU / max-pool / LRN / linear) applies.
Trained on the synthetic concept dataset at 112x112 (``convscope train-demo``); about 2.6 M parameters.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

INPUT_SIZE = 112


class DemoNet(nn.Module):
    """CaffeNet-style classifier for 112x112 RGB inputs, returning logits."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 64, 7, stride=2, padding=3)),
            ("relu1", nn.ReLU()),
            ("pool1", nn.MaxPool2d(3, stride=2, padding=1)),
            ("norm1", nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)),
            ("conv2", nn.Conv2d(64, 128, 5, stride=2, padding=2)),  # ZFNet's strided conv2 (Zeiler & Fergus Fig. 3)
            ("relu2", nn.ReLU()),
            ("conv3", nn.Conv2d(128, 192, 3, padding=1)),
            ("relu3", nn.ReLU()),
            ("conv4", nn.Conv2d(192, 192, 3, padding=1)),
            ("relu4", nn.ReLU()),
            ("conv5", nn.Conv2d(192, 128, 3, padding=1)),
            ("relu5", nn.ReLU()),
            ("pool5", nn.MaxPool2d(3, stride=2, padding=1)),
        ]))
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))  # identity at 112x112; lets other sizes run
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Sequential(OrderedDict([
            ("fc6", nn.Linear(128 * 7 * 7, 256)),
            ("relu6", nn.ReLU()),
            ("drop6", nn.Dropout(dropout)),
            ("fc7", nn.Linear(256, 256)),
            ("relu7", nn.ReLU()),
            ("drop7", nn.Dropout(dropout)),
            ("fc8", nn.Linear(256, num_classes)),
        ]))

        self._init_weights()

    def _init_weights(self) -> None:
        """He initialization (He et al. 2015) for conv/fc layers, small output layer: trains without batch norm."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.fc8.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))
