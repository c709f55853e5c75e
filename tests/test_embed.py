"""embed: pooled features, PCA / t-SNE projections, planted clusters, the report."""

from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from convscope.applications.embed_report import embed_report, scatter_png
from convscope.errors import ConvscopeError
from convscope.methods.embed import embed, pooled_features, project

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4))


def test_features_equal_a_direct_computation() -> None:
    model = tiny_net()
    x = torch.randn(10, 3, 16, 16)
    pooled = pooled_features(model, "3", x, batch_size=3, predict=True, thumbnail=8)
    with torch.no_grad():
        direct = model[:4].double()(x.double()).mean((2, 3))
        logits = model.double()(x.double())
    model.float()
    torch.testing.assert_close(pooled.features.double(), direct, rtol=1e-5, atol=1e-6)
    assert torch.equal(pooled.ids, torch.arange(10))
    assert torch.equal(pooled.predictions, logits.argmax(1))
    assert pooled.thumbnails.shape == (10, 3, 8, 8) and pooled.thumbnails.dtype == torch.uint8
    # an iterable of (batch, ids) pairs gives the same features and keeps the ids
    stream = [(x[:4], [10, 11, 12, 13]), (x[4:], list(range(14, 20)))]
    again = pooled_features(model, "3", stream)
    torch.testing.assert_close(again.features, pooled.features)
    assert again.ids.tolist() == list(range(10, 20)) and again.predictions is None


def test_pca_coordinates_equal_numpy_svd_up_to_sign() -> None:
    model = tiny_net(1)
    x = torch.randn(12, 3, 16, 16)
    emb = embed(model, "2", x, method="pca")
    f = emb.features.double().numpy()
    xc = f - f.mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    ref = xc @ vt[:2].T
    got = emb.coords.numpy()
    for k in range(2):
        sign = np.sign(got[:, k] @ ref[:, k])
        np.testing.assert_allclose(sign * got[:, k], ref[:, k], rtol=1e-6, atol=1e-8)
    assert emb.labels is None and emb.predictions is not None and emb.colours is emb.predictions


def test_tsne_is_deterministic_given_the_seed() -> None:
    feats = torch.randn(40, 8, generator=torch.Generator().manual_seed(3))
    a, b = project(feats, "tsne", seed=5), project(feats, "tsne", seed=5)
    np.testing.assert_array_equal(a, b)
    model = tiny_net(2)
    x = torch.randn(30, 3, 16, 16)
    e1, e2 = embed(model, "1", x, method="tsne", seed=1), embed(model, "1", x, method="tsne", seed=1)
    assert torch.equal(e1.coords, e2.coords) and e1.coords.shape == (30, 2)


def planted(n_per: int = 15, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat images of three far-apart colours, with a little pixel noise: three clusters of mean colours."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]])
    x = colours.repeat_interleave(n_per, 0)[:, :, None, None] + 0.05 * torch.randn(3 * n_per, 3, 16, 16, generator=g)
    return x, torch.arange(3).repeat_interleave(n_per)


@pytest.mark.parametrize("method", ["tsne", "pca"])
def test_planted_clusters_stay_separated(method: str) -> None:
    conv = nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3)[:, :, None, None])
        conv.bias.zero_()
    model = nn.Sequential(conv, nn.ReLU())
    x, labels = planted()
    emb = embed(model, "1", x, labels=labels, method=method, seed=0)
    c = emb.coords.numpy()
    d = np.linalg.norm(c[:, None] - c[None], axis=2)
    lab = labels.numpy()
    same = lab[:, None] == lab[None]
    assert d[~same].min() > d[same].max()  # every pair across clusters is farther apart than any pair within one
    np.fill_diagonal(d, np.inf)
    assert (lab[d.argmin(1)] == lab).all()  # nearest neighbour in 2-D is always from the same cluster
    assert torch.equal(emb.labels, labels) and emb.predictions is None


def test_bad_input_is_one_line_and_the_model_is_untouched() -> None:
    model = tiny_net().train()
    model[0].weight.requires_grad_(False)
    x = torch.randn(6, 3, 16, 16)
    cases = [dict(method="mds"), dict(labels=[0, 1]), dict(labels=[0.5] * 6)]
    for kwargs in cases:
        with pytest.raises(ConvscopeError) as e:
            embed(model, "1", x, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(ConvscopeError, match="unknown layer"):
        embed(model, "nope", x)
    with pytest.raises(ConvscopeError, match="NaN"):
        embed(model, "0", torch.full((6, 3, 16, 16), float("nan")), method="pca")
    with pytest.raises(ConvscopeError, match="at least 3 images"):
        embed(model, "1", x[:2])
    assert model.training and not model[0].weight.requires_grad and model[2].weight.requires_grad
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.skipif(importlib.util.find_spec("umap") is not None, reason="umap-learn is installed")
def test_umap_without_umap_learn_says_how_to_install() -> None:
    with pytest.raises(ConvscopeError, match="pip install umap-learn") as e:
        embed(tiny_net(), "1", torch.randn(5, 3, 16, 16), method="umap")
    assert "\n" not in str(e.value)


def test_embed_report_writes_scatter_page_thumbnails(tmp_path) -> None:
    x, labels = planted(6)
    run = embed_report(tiny_net(), "3", x, tmp_path / "e", labels=labels, class_names=["red", "green", "blue"],
                       method="pca", thumbnail=16, point=12)
    page = run.html.read_text()
    refs = re.findall(r'data-t="([^"]+)"', page)
    assert len(refs) == 18 and all((tmp_path / "e" / r).is_file() for r in refs)
    assert page.count("<circle") == 18 and "label: green" in page and "<script>" in page
    data = json.loads(run.json.read_text())
    assert [p["label"] for p in data["points"]] == labels.tolist()
    np.testing.assert_allclose([[p["x"], p["y"]] for p in data["points"]], run.embedding.coords.numpy())
    assert run.png.stat().st_size > 1000 and len(list(run.thumbs.iterdir())) == 18
    assert len(page) < 40_000  # thumbnails are linked files, not inlined
    img = scatter_png(run.embedding, run.class_names, size=300, thumb=10)
    assert img.size == (300 + 240, 300)
