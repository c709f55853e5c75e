"""Models that do not take RGB: a grayscale (1 x H x W) toy through saliency, Grad-CAM, the overlay, Preprocess,
UpconvNet, and the one-line refusals of the RGB-only image optimizers (inversion, DeepDream)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import convscope as cs
from convscope.core.preprocess import Preprocess
from convscope.core.render import apply_colormap, as_rgb, overlay, to_display, to_pil
from convscope.methods.upconv import train_upconv

from .helpers import assert_untouched, snapshot


class Gray(nn.Module):
    """conv(1 -> 4) -> ReLU -> conv(4 -> 5) -> ReLU ("act") -> global average pool -> linear (3 classes)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(5, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv2(self.relu(self.conv1(x)))).mean((2, 3)))


@pytest.fixture
def net() -> Gray:
    return Gray().double().eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_saliency_and_gradcam_on_grayscale_match_hand_computations(net, x):
    before = snapshot(net)
    sal = cs.saliency(net, x, target=[1, 2])
    cam = cs.gradcam(net, x, target=[1, 2], upsample=False)
    assert_untouched(net, before)
    assert sal.shape == (2, 1, 12, 12) and cam.shape == (2, 1, 12, 12)
    for i, c in enumerate((1, 2)):  # one image, one class at a time, plain autograd
        xi = x[i : i + 1].clone().requires_grad_(True)
        a = F.relu(net.conv2(F.relu(net.conv1(xi))))
        score = net.fc(a.mean((2, 3)))[0, c]
        gx, ga = torch.autograd.grad(score, [xi, a])
        torch.testing.assert_close(sal[i, 0], gx[0, 0].abs())  # one channel: max over channels is |grad|
        ref = F.relu((ga[0].mean((1, 2))[:, None, None] * a[0]).sum(0))
        torch.testing.assert_close(cam[i, 0], ref.detach())
    assert cs.resolve_cam_layer(net) == "act"


def test_overlay_of_grayscale_and_rgba_images_is_the_rgb_overlay():
    g = torch.Generator().manual_seed(2)
    gray, m = torch.rand(2, 1, 8, 8, generator=g), torch.rand(2, 1, 4, 4, generator=g)
    torch.testing.assert_close(overlay(gray, m), overlay(gray.repeat(1, 3, 1, 1), m))
    rgb, alpha = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 1, 8, 8, generator=g)
    composed = rgb * alpha + (1 - alpha)  # over white
    torch.testing.assert_close(overlay(torch.cat([rgb, alpha], 1), m), overlay(composed, m))
    # independent: the blend written out for the grayscale case
    up = F.interpolate(m, size=(8, 8), mode="bilinear", align_corners=False)
    ref = 0.5 * gray.expand(-1, 3, -1, -1) + 0.5 * apply_colormap(to_display(up, "minmax"), "jet")
    torch.testing.assert_close(overlay(gray, m), ref)
    assert as_rgb(rgb) is rgb
    with pytest.raises(cs.ConvscopeError, match="1, 3 or 4 channels"):
        overlay(torch.rand(1, 2, 8, 8), m[:1])
    assert to_pil(torch.cat([rgb, alpha], 1)[0]).mode == "RGBA" and to_pil(gray[0]).mode == "L"


def test_preprocess_with_one_or_four_channel_statistics():
    img = Image.new("RGB", (6, 4), (200, 100, 50))
    gray = Preprocess(mean=(0.5,), std=(0.25,))
    assert gray.channels == 1
    t = gray(img)
    level = round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)  # PIL's "L" conversion (ITU-R 601-2 luma)
    assert t.shape == (1, 4, 6) and torch.allclose(t, torch.full_like(t, (level / 255 - 0.5) / 0.25), atol=1e-3)
    torch.testing.assert_close(gray.denormalize(t), torch.full_like(t, level / 255))
    rgba = Preprocess(mean=(0.1, 0.2, 0.3, 0.4), std=(1.0, 2.0, 4.0, 0.5))
    t4 = rgba(img)
    want = (torch.tensor([200, 100, 50, 255]) / 255 - torch.tensor(rgba.mean)) / torch.tensor(rgba.std)
    assert t4.shape == (4, 4, 6)
    torch.testing.assert_close(t4[:, 0, 0], want.float())
    ident = Preprocess.identity()  # the same value per channel: any channel count
    assert ident.channels is None
    y = torch.rand(2, 1, 5, 5)
    torch.testing.assert_close(ident.normalize(y), y)
    tf = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3)  # uniform RGB statistics apply to grayscale too
    torch.testing.assert_close(tf.normalize(y), (y - 0.5) / 0.5)
    with pytest.raises(cs.ConvscopeError, match="expects a 3 x H x W"):
        Preprocess(mean=(0.1, 0.2, 0.3)).normalize(y)  # ImageNet-like statistics on a grayscale batch
    with pytest.raises(cs.ConvscopeError, match="expects a 1 x H x W"):
        gray.normalize(torch.rand(3, 5, 5))
    with pytest.raises(cs.ConvscopeError, match="as many std values"):
        Preprocess(mean=(0.1, 0.2, 0.3), std=(1.0, 2.0))


def test_the_rgb_only_optimizers_refuse_a_grayscale_model_in_one_line(net, x):
    before = snapshot(net)
    for call in (lambda: cs.invert(net, x, "act", steps=1), lambda: cs.deep_dream(net, x, "act", steps=1, octaves=1),
                 lambda: cs.activation_maximization(net, "act", [0], steps=1, size=16, progress=False)):
        with pytest.raises(cs.ConvscopeError, match="1-channel input") as err:
            call()
        assert "\n" not in str(err.value)
    assert_untouched(net, before)


def test_upconv_decodes_grayscale_images(net, x):
    dec = train_upconv(net, "act", x, epochs=2, batch_size=2, augment=False)
    assert dec.config["channels"] == 1
    out = dec(net.act(net.conv2(net.relu(net.conv1(x)))).detach())
    assert out.shape == x.shape
    with pytest.raises(cs.ConvscopeError, match="N x 1 x H x W"):
        train_upconv(net, "act", x.repeat(1, 3, 1, 1), epochs=1)
