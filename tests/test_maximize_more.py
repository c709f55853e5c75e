"""Multifaceted feature visualization, DGN-AM (generator parametrization) and the maximize report.

Tiny hand-built models and generators with known answers: planted two-mode data for the facets, a linear
generator whose optimal code is closed-form for DGN-AM."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from convscope.applications.maximize_report import maximize_report
from convscope.core.optim import Blur, GeneratorParam, Jitter, make_generators, make_param
from convscope.errors import ConvscopeError, TargetError
from convscope.methods.maximize import dgn_am, encode, kmeans, multifaceted

from .helpers import assert_untouched, hook_count, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


# --------------------------------------------------------------------------- facets


def test_kmeans_finds_planted_blobs_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    truth = torch.arange(3).repeat_interleave(20)
    x = centres[truth] + 0.3 * torch.randn(60, 2, generator=g)
    labels, found = kmeans(x, 3, seed=1)
    for j in range(3):  # each found cluster is exactly one planted blob
        assert len(set(truth[labels == j].tolist())) == 1
    assert torch.allclose(found.sort(0).values, centres.sort(0).values, atol=0.2)
    assert torch.equal(kmeans(x, 3, seed=1)[0], labels)
    with pytest.raises(ConvscopeError, match="distinct points"):
        kmeans(x[:2], 3)


def _two_colour_model() -> nn.Sequential:
    """Layer "0": the RGB channels (identity); layer "1": unit 0 = R + B (fires on red and on blue images), unit 1 =
    G."""
    m = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), nn.Conv2d(3, 2, 1, bias=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        m[1].weight.copy_(torch.tensor([[1.0, 0, 1], [0, 1, 0]]).view(2, 3, 1, 1))
    return m


def _two_mode_data() -> tuple[torch.Tensor, set[int], set[int]]:
    """12 red images, 8 blue ones, 10 dark ones (never in unit 0's top 20), shuffled."""
    g = torch.Generator().manual_seed(0)

    def imgs(c: int, n: int) -> torch.Tensor:
        x = 0.1 * torch.rand(n, 3, 8, 8, generator=g)
        x[:, c] += 0.6 + 0.3 * torch.rand(n, 1, 1, generator=g)
        return x

    x = torch.cat([imgs(0, 12), imgs(2, 8), 0.1 * torch.rand(10, 3, 8, 8, generator=g)])
    perm = torch.randperm(30, generator=g)
    red = set(torch.nonzero(perm < 12).flatten().tolist())
    blue = set(torch.nonzero((perm >= 12) & (perm < 20)).flatten().tolist())
    return x[perm], red, blue


def test_multifaceted_finds_both_modes_and_starts_from_their_means():
    model = _two_colour_model()
    x, red, blue = _two_mode_data()
    before = snapshot(model)
    r = multifaceted(model, "1", 0, x, facets=2, top=20, embed_layer="0", steps=0, progress=False)
    assert_untouched(model, before)
    assert [set(f) for f in r.members[0]] == [red, blue]  # both modes, the larger first
    assert r.labels.shape == (1, 20) and r.top_ids.shape == (1, 20)
    for f, ids in enumerate(r.members[0]):
        mean = x[sorted(ids)].mean(0)
        assert torch.allclose(r.starts[0, f], mean, atol=1e-6)
        assert torch.allclose(r.x[0, f], mean, atol=1e-6)  # 0 steps: the image is its start
    # every member of a facet is one of the unit's top images, strongest first
    for f in range(2):
        ranks = [r.top_ids[0].tolist().index(i) for i in r.members[0][f]]
        assert ranks == sorted(ranks)


def test_multifaceted_optimizes_all_facets_of_all_units_in_one_batch():
    model = _two_colour_model()
    x, _, _ = _two_mode_data()
    stream = [x[:16], x[16:]]  # a re-iterable stream of batches gives the same result as the tensor
    r = multifaceted(model, "1", [0, 1], stream, facets=2, top=10, embed_layer="0", steps=15, regularize="none",
                     lr=0.05, progress=False)
    t = multifaceted(model, "1", [0, 1], x, facets=2, top=10, embed_layer="0", steps=15, regularize="none",
                     lr=0.05, progress=False)
    assert torch.equal(r.images, t.images)
    assert r.images.shape == (2, 2, 3, 8, 8) and r.history.shape == (15, 4)  # one batch of U x F images
    start = r.history[0].view(2, 2)
    assert (r.activations > start + 0.2).all()
    with pytest.raises(ConvscopeError, match="re-iterable"):
        multifaceted(model, "1", 0, iter(stream), facets=2, top=10, steps=1)
    with pytest.raises(TargetError, match="out of range"):
        multifaceted(model, "1", 5, x, facets=2, top=10, steps=1)
    with pytest.raises(ConvscopeError, match="top="):
        multifaceted(model, "1", 0, x, facets=4, top=3, steps=1)


# --------------------------------------------------------------------------- DGN-AM


class LinearGenerator(nn.Module):
    """``G(h) = 0.5 + A h`` as a 3 x 8 x 8 RGB image, with a dropout layer (only the train mode would use it)."""

    def __init__(self, d: int = 6, scale: float = 0.05) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.lin = nn.Linear(d, 192)
        self.drop = nn.Dropout(0.5)
        with torch.no_grad():
            self.lin.weight.copy_(scale * torch.randn(192, d, generator=g))
            self.lin.bias.fill_(0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.drop(self.lin(h)).view(-1, 3, 8, 8)


class SigmoidGenerator(LinearGenerator):
    code_shape = (6,)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(4 * (self.lin(h) - 0.5)).view(-1, 3, 8, 8)


def _linear_units() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 3, 8))  # unit k: <w_k, x> + b_k on the whole 8 x 8 image


def test_dgn_am_reaches_the_closed_form_optimal_code_and_leaves_the_generator_untouched():
    # a(G(h)) - lambda ||h||^2 = <w, 0.5 + A h> + b - lambda ||h||^2  =>  h* = A^T w / (2 lambda)
    gen, model = LinearGenerator(), _linear_units()
    gen.train()  # a non-default mode must come back, and dropout must not run
    gen.lin.weight.grad = None
    lam = 0.05
    g_before, m_before = snapshot(gen), snapshot(model)
    r = dgn_am(model, gen, "0", [0, 1, 2], code_shape=(6,), lambda_code=lam, steps=400, lr=0.02, progress=False)
    assert_untouched(gen, g_before)
    assert_untouched(model, m_before)
    w = model[0].weight.detach().view(3, -1)
    h_star = w @ gen.lin.weight.detach() / (2 * lam)
    assert (gen.lin.weight.detach() @ h_star.T).abs().max() < 0.45  # the optimum stays inside the pixel box
    torch.testing.assert_close(r.codes, h_star, atol=2e-3, rtol=1e-3)
    with torch.no_grad():
        expect = model(gen.lin(h_star).view(-1, 3, 8, 8))[torch.arange(3), torch.arange(3)].flatten()
    torch.testing.assert_close(r.activations, expect, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(r.images, (0.5 + (gen.lin.weight.detach() @ r.codes.T).T).view(3, 3, 8, 8),
                               atol=1e-5, rtol=1e-5)


def test_dgn_am_ascends_monotonically_batches_units_and_starts_from_a_given_code():
    gen, model = SigmoidGenerator(), _linear_units()
    gen.train()
    r = dgn_am(model, gen, "0", [0, 1, 2], lambda_code=0.0, steps=30, lr=3.0, optimizer="sgd", progress=False)
    assert (r.history.diff(dim=0) >= -1e-6).all()  # small plain gradient steps on a smooth objective
    assert (r.activations > r.history[0] + 0.1).all()
    one = dgn_am(model, gen, "0", [2], lambda_code=0.0, steps=30, lr=3.0, optimizer="sgd", seed=2, progress=False)
    torch.testing.assert_close(one.images[0], r.images[2])  # a batch = its units one at a time
    assert hook_count(gen) == 0 and gen.training and all(p.requires_grad and p.grad is None
                                                         for p in gen.parameters())
    h0 = torch.linspace(-1, 1, 6)[None]
    s = dgn_am(model, gen, "0", [0, 1], code_init=h0, steps=0, progress=False)
    torch.testing.assert_close(s.codes, h0.expand(2, 6))
    with torch.no_grad():
        torch.testing.assert_close(s.images, gen.eval()(h0).expand(2, 3, 8, 8))
    c = dgn_am(model, gen, "0", 0, code_init="noise", code_range=(0.0, 0.5), steps=3, progress=False)
    assert c.codes.min() >= 0 and c.codes.max() <= 0.5


def test_dgn_am_errors_name_the_fix():
    model = _linear_units()
    with pytest.raises(ConvscopeError, match="code_shape"):
        dgn_am(model, LinearGenerator(), "0", 0, steps=1)
    bad = nn.Linear(6, 5)
    with pytest.raises(ConvscopeError, match="x 3 x H x W"):
        dgn_am(model, bad, "0", 0, code_shape=(6,), steps=1)
    with pytest.raises(ConvscopeError, match="pixel parametrization"):
        dgn_am(model, SigmoidGenerator(), "0", 0, regularizers=[Blur(1.0)], steps=1)
    with pytest.raises(ConvscopeError, match="output="):
        dgn_am(model, SigmoidGenerator(), "0", 0, output="pixels", steps=1)
    dgn_am(model, SigmoidGenerator(), "0", 0, regularizers=[Jitter(1)], steps=1, progress=False)  # transforms work


def test_generator_param_is_not_a_submodule_and_encode_gives_layer_features():
    gen = SigmoidGenerator()
    like = torch.zeros(())
    param = make_param(GeneratorParam(gen, (6,)), "zeros", 2, (8, 8), _pre(), make_generators(0, 2), like)
    assert [n for n, _ in param.named_parameters()] == ["code"]
    model = _linear_units()
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(encode(model, "0", x), model(x).detach())


def _pre():
    from convscope.core.images import Preprocess

    return Preprocess.identity()


# --------------------------------------------------------------------------- the report


def test_maximize_report_writes_pictures_html_and_json(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    other = nn.Sequential(nn.Conv2d(3, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.rand(5, 3, 16, 16)
    before = snapshot(model)
    run = maximize_report(model, ["1", "logits"], units=2, classes=[0, 2], presets=("none", "yosinski"), steps=3,
                          size=16, images=x, transfer=[other], out=tmp_path, progress=False)
    assert_untouched(model, before)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["am_1.png", "am_logits.png", "am_overview.png", "maximize.html", "maximize.json"]
    data = json.loads((tmp_path / "maximize.json").read_text())
    assert len(data["rows"]) == 2 * 2 + 2 * 2 and len(data["summary"]) == 4
    conv = [r for r in data["rows"] if r["layer"] == "1"]
    with torch.no_grad():
        ds = model[:2](x).mean((2, 3)).amax(0)
    for r in conv:  # the dataset reference is the unit's best channel mean over the images
        assert r["dataset_max"] == pytest.approx(float(ds[r["unit"]]), rel=1e-5)
        assert r["ratio"] == pytest.approx(r["value"] / r["dataset_max"], rel=1e-6)
    assert {r["unit"] for r in conv} == set(ds.topk(2).indices.tolist())  # the strongest units
    cls = [r for r in data["rows"] if r["layer"] == "logits"]
    assert all(0 <= r["p[transfer0]"] <= 1 and 0 <= r[f"p[{type(model).__name__}]"] <= 1 for r in cls)
    assert "<table>" in (tmp_path / "maximize.html").read_text()
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp file
    assert [p.name for p in run.pngs] == ["am_1.png", "am_logits.png", "am_overview.png"]
