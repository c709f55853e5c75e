"""layer="auto": the last spatial map in the order modules RUN (not the order they were registered), before global
pooling; checked against the input the model's own pooling layer receives."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convscope.core.probe import probe
from convscope.methods.cam import default_cam_layer, gradcam, resolve_cam_layer
from convscope.models import load_model

from .helpers import assert_untouched, snapshot

ZOO_PICKS = {  # name: (input size, the choice, the pooling module it feeds or None)
    "resnet18": (64, "layer4.1", "avgpool"),  # registration order ended at layer4.1.bn2 (before the add and ReLU)
    "resnet50": (64, "layer4.2", "avgpool"),
    "vgg16": (32, "features.29", "features.30"),  # the last conv's ReLU, before the last max-pool
    "densenet121": (64, "features.norm5", None),  # its last ReLU is functional (F.relu in forward): no module map
    "mobilenet_v3_large": (64, "features.16.2", "avgpool"),
    "convnext_tiny": (64, "features.7.2", "avgpool"),  # registration order ended at stochastic_depth (before the add)
    "demo_net": (64, "features.relu5", "features.pool5"),
    "efficientnet_lite0": (64, "head.act", "pool"),
}


@pytest.fixture(scope="module")
def zoo() -> dict[str, nn.Module]:
    logging.disable(logging.WARNING)  # "random weights" warnings of the torchvision architectures
    try:
        torch.manual_seed(0)
        return {name: load_model(name) for name in ZOO_PICKS}
    finally:
        logging.disable(logging.NOTSET)


@pytest.mark.parametrize("name", list(ZOO_PICKS))
def test_auto_layer_on_the_zoo_is_the_last_map_that_runs(zoo, name):
    model = zoo[name]
    size, pick, pool = ZOO_PICKS[name]
    before = snapshot(model)
    chosen = default_cam_layer(model, input_size=size)
    assert chosen == pick
    assert_untouched(model, before)
    if pool is None:
        return
    fed: list[torch.Tensor] = []  # independent: what the pooling module receives, by a plain forward pre-hook
    handle = dict(model.named_modules())[pool].register_forward_pre_hook(lambda _m, a: fed.append(a[0].clone()))
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad(), probe(model, chosen, detach=True) as p:
            model(x)
    finally:
        handle.remove()
    torch.testing.assert_close(p.activations[chosen], fed[0])


class LateRegistered(nn.Module):
    """``late`` is registered first but runs last; the block's ReLU is shared (runs twice). Both convolutions take
    one channel (the input check reads the channel count from the first registered convolution)."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Conv2d(1, 5, 3, padding=1)
        self.early = nn.Conv2d(1, 1, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.late(self.relu(self.early(x))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class Doubled(nn.Module):
    """conv -> ReLU (``act``), then the block doubles the ReLU's output in place and returns it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x)).mul_(2)


class InPlaceAfter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Doubled()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(x).mean((2, 3)))


def test_execution_order_shared_calls_and_grayscale_input():
    net = LateRegistered()
    assert default_cam_layer(net, input_size=12) == "relu:1"  # the shared ReLU's second call, after `late`
    x = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gradcam(net, x), gradcam(net, x, layer="relu:1"))


def test_an_in_place_change_of_a_child_map_is_not_taken_for_the_same_map():
    net = InPlaceAfter()
    # block returns act's output tensor, doubled in place: same storage, another map, so "block" is the answer
    assert default_cam_layer(net, input_size=12) == "block"
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad(), probe(net, "block", detach=True) as p:
        net(x)
    torch.testing.assert_close(p.activations["block"], 2 * F.relu(net.block.conv(x)))


def test_the_choice_is_cached_per_size_and_resolve_uses_it(demo):
    assert resolve_cam_layer(demo) == resolve_cam_layer(demo, "auto") == resolve_cam_layer(demo, "") == \
        default_cam_layer(demo)
    assert default_cam_layer(demo, input_size=(64, 80)) == "features.relu5"
