"""UpconvNet (methods/upconv.py): exact unpooling, decoder shapes, overfitting one image, checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convscope.errors import ConvscopeError, ModelLoadError
from convscope.methods.perturb import perturbation_study
from convscope.methods.upconv import UpconvNet, load_upconv, reconstruct, save_upconv, train_upconv, unpool2x

from .helpers import assert_untouched, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _encoder() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


def _image(n: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 16), torch.linspace(0, 1, 16), indexing="ij")
    base = torch.stack([yy, xx, (yy - xx).abs()])  # a smooth image: learnable in a few steps
    return (base + 0.05 * torch.randn(n, 3, 16, 16, generator=g)).clamp(0, 1)


def test_unpool_places_values_top_left_and_zeros_elsewhere():
    x = torch.arange(1.0, 7.0).view(1, 1, 2, 3)
    y = unpool2x(x)
    expect = torch.tensor([[1.0, 0, 2, 0, 3, 0], [0, 0, 0, 0, 0, 0], [4, 0, 5, 0, 6, 0], [0, 0, 0, 0, 0, 0]])
    assert torch.equal(y, expect.view(1, 1, 4, 6))
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    unpool2x(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("upsample", ["unpool", "transposed"])
@pytest.mark.parametrize("code_shape,size", [((8, 7, 7), (112, 112)), ((8, 3, 3), (10, 10)), ((20,), (32, 32))])
def test_decoder_maps_codes_to_images(upsample, code_shape, size):
    dec = UpconvNet(code_shape, size, upsample=upsample, width=4, max_width=16)
    out = dec(torch.randn(2, *code_shape))
    assert out.shape == (2, 3, *size)
    assert dec.pixels(torch.randn(1, *code_shape)).min() >= 0
    with pytest.raises(ConvscopeError, match="train_upconv"):
        dec(torch.randn(2, 5))


def test_tiny_upconv_overfits_one_image_and_round_trips(tmp_path):
    model = _encoder()
    before = snapshot(model)
    x = _image()
    path = tmp_path / "dec.pt"
    dec = train_upconv(model, "1", x, epochs=150, lr=3e-3, batch_size=1, augment=False, width=8, seed=0, out=path,
                       progress=False)
    assert_untouched(model, before)
    assert dec.losses[-1] < dec.losses[0] / 10
    assert dec.layer == "1" and dec.code_shape == (8, 8, 8) and dec.image_size == (16, 16)
    back = load_upconv(path)
    assert back.config == dec.config and back.losses == dec.losses
    code = torch.randn(2, 8, 8, 8)
    assert torch.equal(back(code), dec(code))
    rec = reconstruct(model, back, x)
    assert_untouched(model, before)
    assert rec.images.shape == (1, 3, 16, 16) and rec.layers == ["1"]
    assert float((rec.x - x).pow(2).mean()) == pytest.approx(dec.losses[-1], rel=0.5)
    assert 0 <= float(rec.error[0]) < 1


def test_training_is_seeded_and_takes_a_stream():
    model = _encoder()
    x = _image(4)
    a = train_upconv(model, "3", x, epochs=2, batch_size=2, width=4, seed=1, progress=False)
    b = train_upconv(model, "3", lambda: iter([x[:2], x[2:]]), epochs=2, batch_size=2, width=4, seed=1,
                     progress=False)
    assert a.code_shape == (10,) and b.code_shape == (10,)
    c = train_upconv(model, "3", x, epochs=2, batch_size=2, width=4, seed=1, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))


def test_perturbation_study_with_a_decoder():
    model = _encoder()
    dec = train_upconv(model, "1", _image(2), epochs=2, width=4, progress=False)
    study = perturbation_study(model, _image(2), "1", decoder=dec)
    assert study.method == "upconv" and study.images.shape == (4, 2, 3, 16, 16)
    assert torch.equal(study.image_error[0], torch.zeros(2))


def test_bad_checkpoints_and_inputs_raise(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_upconv(tmp_path / "missing.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ModelLoadError, match="not a convscope UpconvNet"):
        load_upconv(tmp_path / "other.pt")
    dec = UpconvNet((4, 2, 2), (8, 8))
    save_upconv(dec, tmp_path / "d.pt")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    with pytest.raises(ConvscopeError):
        train_upconv(_encoder(), "1", torch.zeros(0, 3, 16, 16), progress=False)
    with pytest.raises(ConvscopeError, match="upsample"):
        UpconvNet((4, 2, 2), (8, 8), upsample="nearest")
