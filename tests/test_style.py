"""Style transfer (applications/style.py): the Gram matrix and Gatys' style loss against hand computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convscope.applications.style import gram, gram_match, style_transfer
from convscope.errors import ConvscopeError

from .helpers import assert_untouched, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _tiny_cnn() -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU())


def test_gram_matches_hand_computation():
    f = torch.tensor([[[[1.0, 2.0], [0.0, -1.0]], [[3.0, 0.0], [1.0, 1.0]]]])  # 1 x 2 channels x 2 x 2
    # F = [[1, 2, 0, -1], [3, 0, 1, 1]]: G = F F^T
    expect = torch.tensor([[1 + 4 + 0 + 1, 3 + 0 + 0 - 1], [3 + 0 + 0 - 1, 9 + 0 + 1 + 1]])
    assert torch.equal(gram(f, normalize=False)[0], expect)
    assert torch.allclose(gram(f)[0], expect / 4)


def test_gram_match_is_gatys_style_loss():
    torch.manual_seed(0)
    x, s = torch.randn(2, 3, 4, 5), torch.randn(1, 3, 4, 5)
    n_l, m_l = 3, 20
    obj = gram_match("L", gram(s))
    e = torch.stack([((gram(x[i:i + 1], False) - gram(s, False)) ** 2).sum() / (4 * n_l**2 * m_l**2)
                     for i in range(2)])  # Gatys et al. 2016, Eq. 4
    assert torch.allclose(-obj({"L": x}), e, rtol=1e-5)


def test_style_transfer_moves_towards_the_style_and_keeps_the_model():
    model = _tiny_cnn()
    before = snapshot(model)
    g = torch.Generator().manual_seed(0)
    content = 0.3 + 0.4 * torch.rand(1, 3, 16, 16, generator=g)
    stripes = (torch.arange(16) % 4 < 2).float().view(1, 1, 1, 16).expand(1, 3, 16, 16).clone()
    only_content = style_transfer(model, content, stripes, "1", ["1", "3"], alpha=1.0, beta=0.0, steps=20,
                                  progress=False)
    assert torch.allclose(only_content.x, content, atol=1e-6)  # starts at the content: nothing to do
    res = style_transfer(model, content, stripes, "1", ["1", "3"], alpha=0.0, beta=1.0, steps=60, progress=False)
    assert_untouched(model, before)
    assert res.style_loss[0] < 0.2 * only_content.style_loss[0]
    assert res.content_loss[0] > 0 and res.images.shape == (1, 3, 16, 16)
    mixed = style_transfer(model, content, stripes, "1", ["1", "3"], alpha=1.0, beta=1e5, steps=60, progress=False)
    assert res.style_loss[0] < mixed.style_loss[0] < only_content.style_loss[0]
    assert only_content.content_loss[0] < mixed.content_loss[0] < res.content_loss[0]
    assert res.content_layer == "1" and res.style_layers == ["1", "3"]


def test_style_transfer_errors_name_the_fix():
    model = _tiny_cnn()
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ConvscopeError, match="content_layer="):
        style_transfer(model, x, x[:1], steps=1)
    with pytest.raises(ConvscopeError, match="give 1 or 2"):
        style_transfer(model, x, torch.rand(3, 3, 8, 8), "1", ["1"], steps=1)
    with pytest.raises(ConvscopeError, match="style_weights"):
        style_transfer(model, x, x[:1], "1", ["1"], style_weights=[1, 2], steps=1)
