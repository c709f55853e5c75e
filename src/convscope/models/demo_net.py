"""``demo_net``: the project's own classic CaffeNet/ZFNet-style network (Krizhevsky et al. 2012; Zeiler & Fergus 2014).

Five convolutions with ReLU, max pooling and local response normalization, then three fully connected layers.
At 112x112: conv1 64x56x56 -> pool1 28x28 -> conv2 (stride 2) 128x14x14 -> conv3..5 at 14x14 -> pool5 128x7x7.
Every operation is its own named module (``features.conv1`` ... ``features.pool5``, ``classifier.fc6`` ...
``classifier.fc8``), so the DeconvNet's exact classic path (conv / ReLU / max-pool / LRN / linear) applies.
Trained on the synthetic concept dataset at 112x112 (``convscope train-demo``); about 2.6 M parameters.

Training uses batch normalization after each convolution and fc6/fc7 (Ioffe & Szegedy 2015; ``batch_norm=True``)
because the plain network learns too slowly for a 15-minute CPU budget; :func:`fold_batchnorm` then folds every
eval-mode ``bnK`` into ``convK`` / ``fcK`` (``w' = w * gamma / sqrt(var + eps)``,
``b' = (b - mean) * gamma / sqrt(var + eps) + beta``), so the bundled network is the classic
conv / ReLU / max-pool / LRN / linear stack with the same outputs.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import cast

import torch
from torch import nn

INPUT_SIZE = 112


class DemoNet(nn.Module):
    """CaffeNet-style classifier for 112x112 RGB inputs, returning logits."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.5, batch_norm: bool = False) -> None:
        super().__init__()
        convs = {  # name: (in, out, kernel, stride); padding keeps "same" size before the stride
            "1": (3, 64, 7, 2),
            "2": (64, 128, 5, 2),  # ZFNet's strided conv2 (Zeiler & Fergus Fig. 3)
            "3": (128, 192, 3, 1),
            "4": (192, 192, 3, 1),
            "5": (192, 128, 3, 1),
        }
        layers: list[tuple[str, nn.Module]] = []
        for k, (c_in, c_out, ks, stride) in convs.items():
            layers.append((f"conv{k}", nn.Conv2d(c_in, c_out, ks, stride=stride, padding=ks // 2)))
            if batch_norm:
                layers.append((f"bn{k}", nn.BatchNorm2d(c_out)))
            layers.append((f"relu{k}", nn.ReLU()))
            if k == "1":
                layers += [("pool1", nn.MaxPool2d(3, stride=2, padding=1)),
                           ("norm1", nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0))]
        layers.append(("pool5", nn.MaxPool2d(3, stride=2, padding=1)))
        self.features = nn.Sequential(OrderedDict(layers))
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))  # identity at 112x112; lets other sizes run
        self.flatten = nn.Flatten(1)
        fc: list[tuple[str, nn.Module]] = []
        for k, (f_in, f_out) in {"6": (128 * 7 * 7, 256), "7": (256, 256)}.items():
            fc.append((f"fc{k}", nn.Linear(f_in, f_out)))
            if batch_norm:
                fc.append((f"bn{k}", nn.BatchNorm1d(f_out)))
            fc += [(f"relu{k}", nn.ReLU()), (f"drop{k}", nn.Dropout(dropout))]
        fc.append(("fc8", nn.Linear(256, num_classes)))
        self.classifier = nn.Sequential(OrderedDict(fc))

        self._init_weights()

    def _init_weights(self) -> None:
        """He initialization (He et al. 2015) for conv/fc layers, small output layer: trains without batch norm."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(cast(torch.Tensor, m.bias))  # every layer is built with a bias
        nn.init.normal_(cast(nn.Linear, self.classifier.fc8).weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


@torch.no_grad()
def fold_batchnorm(model: DemoNet) -> DemoNet:
    """A plain ``DemoNet`` (no batch norm) computing what ``model`` computes in eval mode: each ``bnK`` folded into
    ``convK``.  ``model`` is not modified; a model without batch norm is returned as a copy."""
    n_classes = cast(nn.Linear, model.classifier.fc8).out_features
    plain = DemoNet(num_classes=n_classes, dropout=cast(nn.Dropout, model.classifier.drop6).p)
    state = {k: v.clone() for k, v in model.state_dict().items() if ".bn" not in k}
    for k, part, layer in [(k, "features", f"conv{k}") for k in "12345"] + [(k, "classifier", f"fc{k}") for k in "67"]:
        bn = getattr(getattr(model, part), f"bn{k}", None)
        if bn is None:
            continue
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        w, b = state[f"{part}.{layer}.weight"], state[f"{part}.{layer}.bias"]
        state[f"{part}.{layer}.weight"] = w * scale.view(-1, *[1] * (w.dim() - 1))
        state[f"{part}.{layer}.bias"] = (b - bn.running_mean) * scale + bn.bias
    plain.load_state_dict(state)
    return plain.train(model.training)
