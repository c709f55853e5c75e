"""train_upconv's feature-space loss (Dosovitskiy & Brox 2016b), batch-norm decoders, float16 files, the bundled
DGN-AM generator."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from convscope.errors import ConvscopeError, ModelLoadError
from convscope.methods.upconv import UpconvNet, load_generator, load_upconv, reconstruct, save_upconv, train_upconv

from .helpers import assert_untouched, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, 8, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
                                     conv2=nn.Conv2d(8, 8, 3, padding=1), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2)))


def _images(n: int, seed: int = 0) -> torch.Tensor:
    """Squares of random colour and place on a noisy background, 16 px."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.rand(n, 3, 16, 16, generator=g)
    for i in range(n):
        a, b = torch.randint(0, 9, (2,), generator=g).tolist()
        x[i, :, a:a + 7, b:b + 7] = torch.rand(3, 1, 1, generator=g)
    return x


def test_reported_loss_is_pixel_plus_weighted_feature_term_by_hand():
    """The first step's loss, recomputed in float64 from the same initial decoder: mean (D(h) - x)^2 +
    lambda * mean (C(D(h)) - C(x))^2 / mean C(x)^2."""
    model, x, lam = _net(), _images(6), 0.7
    dec = train_upconv(model, "pool2", x, epochs=1, batch_size=6, augment=False, width=4, norm="batch",
                       feature_loss=lam, feature_layer="relu1", upsample="transposed", seed=3, progress=False)
    torch.manual_seed(3)  # train_upconv builds its decoder under manual_seed(seed)
    ref = UpconvNet((8, 4, 4), (16, 16), width=4, norm="batch", upsample="transposed").double().train()
    m64 = _net().double()
    xd = x.double()
    with torch.no_grad():
        code = m64[:6](xd)
        ref.code_scale.fill_(1 / float(code.pow(2).mean().sqrt()))
        y = ref(code)
        c_x, c_y = m64[:2](xd), m64[:2](y)
    pixel = float((y - xd).pow(2).mean())
    feat = float((c_y - c_x).pow(2).mean() / c_x.pow(2).mean())
    assert dec.feature_losses[0] == pytest.approx(feat, rel=1e-4)
    assert dec.losses[0] == pytest.approx(pixel + lam * feat, rel=1e-4)
    assert feat > 0.05 and pixel > 0.05  # both terms matter in the check


def test_feature_loss_lowers_the_feature_error_more_than_pixels_alone():
    model, x = _net(), _images(16)
    before = snapshot(model)
    kw = dict(epochs=40, batch_size=8, augment=False, width=4, lr=3e-3, seed=0, progress=False)
    pix = train_upconv(model, "pool2", x, **kw)
    both = train_upconv(model, "pool2", x, feature_loss=1.0, **kw)
    assert_untouched(model, before)
    assert pix.feature_losses == [] and len(both.feature_losses) == 40
    assert both.feature_losses[-1] < both.feature_losses[0] / 2
    held = _images(16, seed=1)
    err_pix = float(reconstruct(model, pix, held).error.mean())
    err_both = float(reconstruct(model, both, held).error.mean())
    assert err_both < 0.8 * err_pix
    assert_untouched(model, before)


def test_float16_file_round_trips_with_its_info(tmp_path):
    dec = UpconvNet((8, 4, 4), (16, 16), width=4, norm="batch", upsample="transposed").eval()
    code = torch.rand(3, 8, 4, 4)
    save_upconv(dec, tmp_path / "a.pt")
    save_upconv(dec, tmp_path / "b.pt", dtype=torch.float16, info={"steps": 7})
    assert (tmp_path / "b.pt").stat().st_size < 0.7 * (tmp_path / "a.pt").stat().st_size
    back = load_upconv(tmp_path / "b.pt")
    assert back.info == {"steps": 7} and back.config == dec.config
    assert all(p.dtype == torch.float32 for p in back.parameters())
    with torch.no_grad():
        assert torch.allclose(back(code), dec(code), atol=2e-2)


def test_bad_options_raise_one_line():
    model, x = _net(), _images(2)
    with pytest.raises(ConvscopeError, match="feature_loss"):
        train_upconv(model, "pool2", x, epochs=1, feature_loss=-1.0)
    with pytest.raises(ConvscopeError, match="norm"):
        UpconvNet((8, 4, 4), (16, 16), norm="layer")
    with pytest.raises(ModelLoadError, match="no bundled generator"):
        load_generator("efficientnet_lite0")


def test_bundled_demo_net_generator_decodes_pool5_codes():
    dec = load_generator("demo_net")
    assert dec.layer == "features.pool5" and dec.code_shape == (128, 7, 7) and dec.image_size == (112, 112)
    assert dec.info["train_images"] > 0 and dec.info["feature_loss"] > 0
    with torch.no_grad():
        img = dec.pixels(torch.rand(2, 128, 7, 7))
    assert img.shape == (2, 3, 112, 112) and torch.isfinite(img).all()
