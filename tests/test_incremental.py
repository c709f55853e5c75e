"""Incremental occlusion (dirty boxes, Nakandala et al. 2019) against full forward passes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convscope as cs
from convscope.methods.incremental import Axis, cone, conv_pads
from convscope.models.efficientnet import SamePadConv2d

from .helpers import assert_untouched, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: thread-pool overhead would dominate


class Block(nn.Module):
    """Residual block: 1x1 expand, depthwise 3x3, BN, ReLU6, 1x1 project, BN, skip (as MBConv)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(c, 2 * c, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(2 * c)
        self.act0 = nn.ReLU6()
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.act1 = nn.ReLU()
        self.project = nn.Conv2d(2 * c, c, 1)
        self.bn1 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.project(self.act1(self.dw(self.act0(self.bn0(self.expand(x))))))) + x


class Tiny(nn.Module):
    """Every supported kind of op: TF-SAME stride-2 conv, dilated conv, max pool with padding, average pool,
    residual blocks, channel concatenation, a scalar product, then global pooling and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = SamePadConv2d(3, 6, 3, stride=2)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU(inplace=True)
        self.block1 = Block(6)
        self.dil = nn.Conv2d(6, 6, 3, padding=2, dilation=2)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.block2 = Block(12)
        self.avg = nn.AvgPool2d(2, stride=1)
        self.head = nn.Linear(12, 4)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, t in self.named_parameters():
                t.copy_(torch.randn(t.shape, generator=g) * 0.4 + (1.0 if name.endswith("bn.weight") else 0.0))
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block1(self.act(self.bn(self.stem(x))))
        h = torch.cat([h, F.relu(self.dil(h)) * 0.5], dim=1)
        h = self.avg(self.block2(self.pool(h)))
        return self.head(h.mean((2, 3)))


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 23, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("window, stride, batch_size", [(5, 3, 64), ((7, 4), (5, 2), 7), (3, 3, 1000)])
def test_equals_full_forward_passes_float64(x, window, stride, batch_size):
    net = Tiny().eval()
    kw = {"target": [[0, 3], [2, 2]], "window": window, "stride": stride, "batch_size": batch_size}
    inc = cs.occlusion(net, x, layer="block1.act1", incremental=True, **kw)
    full = cs.occlusion(net, x, layer="block1.act1", incremental=False, **kw)
    assert inc.path.startswith("incremental inference") and full.path.startswith("full forward passes")
    torch.testing.assert_close(inc.scores, full.scores, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(inc.maps, full.maps, rtol=1e-10, atol=1e-12)
    assert torch.equal(inc.predicted, full.predicted)
    torch.testing.assert_close(inc.strongest_unit, full.strongest_unit, rtol=1e-10, atol=1e-12)
    assert torch.equal(inc.unit, full.unit)


def test_strongest_unit_of_a_container_and_a_late_layer(x):
    net = Tiny().eval()
    for layer in ("block2", "avg", "block1"):
        inc = cs.occlusion(net, x, target=1, window=6, stride=4, layer=layer)
        full = cs.occlusion(net, x, target=1, window=6, stride=4, layer=layer, incremental=False)
        assert inc.path.startswith("incremental"), inc.path
        torch.testing.assert_close(inc.strongest_unit, full.strongest_unit, rtol=1e-10, atol=1e-12)


def test_model_untouched_also_when_the_target_raises(x):
    net = Tiny().train()
    net.act.inplace = True
    before = snapshot(net)
    cs.occlusion(net, x, target=0, window=5, stride=5, layer="block1")
    assert_untouched(net, before)
    calls = []

    def fails_later(out: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("target failed")
        return out[:, :1]

    with pytest.raises(RuntimeError, match="target failed"):
        cs.occlusion(net, x, target=fails_later, window=5, stride=5, batch_size=3)
    assert_untouched(net, before)


class Upsampling(nn.Module):
    """A nearest-neighbour upsampling between convolutions: not a dirty-box op."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 2, 3, padding=1)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(F.interpolate(self.c1(x), scale_factor=2)).mean((2, 3))


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 2, 3)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c(x)
        return (h if h.sum() > 0 else -h).mean((2, 3))


@pytest.mark.parametrize("net, reason", [(Upsampling(), "interpolate"), (Branchy(), "cannot trace")])
def test_fallback_equals_full_path_and_says_so(x, net, reason):
    full = cs.occlusion(net, x, target=1, window=5, stride=4, incremental=False)
    auto = cs.occlusion(net, x, target=1, window=5, stride=4)
    assert auto.path.startswith("full forward passes") and reason in auto.path and "\n" not in auto.path
    torch.testing.assert_close(auto.maps, full.maps, rtol=0, atol=0)
    with pytest.warns(UserWarning, match=f"occlusion: full forward passes.*{reason}"):
        forced = cs.occlusion(net, x, target=1, window=5, stride=4, incremental=True)
    torch.testing.assert_close(forced.maps, full.maps, rtol=0, atol=0)


def test_hooks_on_the_model_mean_full_passes(x):
    net = Tiny().eval()
    seen = []
    h = net.block1.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    try:
        res = cs.occlusion(net, x, target=0, window=8, stride=8, batch_size=64)
    finally:
        h.remove()
    assert "hooks" in res.path and seen == [2, 2 * len(res.rows) * len(res.cols)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cs.occlusion(net, x, target=0, window=8, stride=8)  # "auto" does not warn


def test_cone_matches_the_outputs_a_change_reaches():
    """The dirty box of a convolution = the outputs that change when the input box changes (brute force)."""
    g = torch.Generator().manual_seed(3)
    for k, s, d, p, n in [(3, 1, 1, 1, 11), (3, 2, 1, 0, 12), (5, 2, 1, 2, 13), (3, 1, 2, 2, 10), (1, 2, 1, 0, 9),
                          (2, 3, 1, 1, 14)]:
        conv = nn.Conv1d(1, 1, k, stride=s, padding=p, dilation=d, bias=False)
        with torch.no_grad():
            conv.weight.fill_(1.0)
        base = torch.rand(1, 1, n, generator=g) + 1
        out = conv(base)
        starts = list(range(0, n - 2))
        box = cone(Axis(starts, 3, n), k, s, d, p, out.shape[-1])
        for i, r in enumerate(starts):
            changed = base.clone()
            changed[..., r:r + 3] += 1.0
            hit = (conv(changed) != out)[0, 0].nonzero().flatten().tolist()
            inside = set(range(box.starts[i], box.starts[i] + box.size))
            assert set(hit) <= inside, (k, s, d, p, r)
            if hit:
                assert min(hit) == box.starts[i] or box.starts[i] + box.size == out.shape[-1]


def test_same_padding_of_tf_convolutions():
    m = SamePadConv2d(3, 3, 3, stride=2)
    assert conv_pads(m, (23, 20)) == ((1, 1), (0, 1))  # 23: total 2 (1, 1); 20: total 1, the extra one after
    assert conv_pads(nn.Conv2d(3, 3, 4, padding="same"), (8, 8)) == ((1, 2), (1, 2))
    assert conv_pads(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), (8, 8)) is None


def test_lite0_float32_within_1e_4(lite0):
    net = lite0
    x = net.preprocess.normalize(torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    inc = cs.occlusion(net, x, target=cs.top_k(2), window=32, stride=32, layer="blocks.3")
    full = cs.occlusion(net, x, target=cs.top_k(2), window=32, stride=32, layer="blocks.3", incremental=False)
    assert inc.path.startswith("incremental")
    scale = full.scores.abs().max()
    assert (inc.scores - full.scores).abs().max() <= 1e-4 * scale
    assert (inc.strongest_unit - full.strongest_unit).abs().max() <= 1e-4 * full.strongest_unit.abs().max()


def test_bad_incremental_value(x):
    with pytest.raises(cs.ConvscopeError, match="incremental"):
        cs.occlusion(Tiny(), x, target=0, incremental="yes")  # type: ignore[arg-type]


def test_copy_bytes_is_the_largest_dirty_box_and_auto_batches_by_it():
    """One 3x3 conv (4 -> 5 channels, padding 1) on 16 x 16, window 4 / stride 4: a copy's dirty box at the conv
    output is the window grown by the kernel's reach, 6 x 6 (clipped to the map where it meets an edge), so one
    copy holds 5 x 6 x 6 float32 there (times the workspace factor), far less than the 5 x 16 x 16 map; "auto"
    therefore runs every copy in one pass, and the maps equal one copy per pass."""
    from convscope.core.batching import auto_batch_size
    from convscope.methods.incremental import COPY_WORKSPACE, copy_bytes, plan_incremental

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(5, 3)).eval()
    x = torch.rand(1, 4, 16, 16)
    starts = [0, 4, 8, 12]
    with torch.no_grad():
        out = net(x)
    plan, _ = plan_incremental(net, x, out, starts, starts, (4, 4), None, None)
    assert plan is not None
    assert copy_bytes(plan) == COPY_WORKSPACE * 5 * 6 * 6 * 4
    assert copy_bytes(plan) < COPY_WORKSPACE * 5 * 16 * 16 * 4
    assert auto_batch_size(net, x, row_bytes=copy_bytes(plan), limit=16) == 16
    auto = cs.occlusion(net, x, window=4, stride=4, progress=False).maps
    one = cs.occlusion(net, x, window=4, stride=4, batch_size=1, progress=False).maps
    torch.testing.assert_close(auto, one)
