"""DeepDream: the normalized L2 ascent step, octave sizes, growth of the layer norm, valid range, model untouched."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convscope.applications.dream_report import dream_report
from convscope.core.images import Preprocess
from convscope.core.optim import activation_l2, mean_abs_normalized
from convscope.core.render import save_png
from convscope.errors import ConvscopeError
from convscope.methods.dream import deep_dream, octave_sizes

pytestmark = pytest.mark.usefixtures("one_thread")


class Spy(nn.Module):
    """Identity that records the spatial size of every input it sees (no hooks)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[-2:]))
        return x


def small_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(Spy(), nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU())


def photo(n: int = 1, size: tuple[int, int] = (32, 32), seed: int = 0) -> torch.Tensor:
    """A smooth random RGB picture in [0.2, 0.8]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g, dtype=torch.float64)
    return (0.2 + 0.6 * F.interpolate(low, size=size, mode="bilinear", align_corners=False)).float()


def test_octave_sizes_as_specified() -> None:
    # 64 -> 45.7 -> 46 -> 32.9 -> 33 -> 23.6 -> 24 and 48 -> 34.3 -> 34 -> 24.3 -> 24 -> 17.1 -> 17: rounded each time
    assert octave_sizes((64, 48), 4, 1.4) == [(24, 17), (33, 24), (46, 34), (64, 48)]
    assert octave_sizes((30, 30), 1, 1.4) == [(30, 30)]
    model = small_net()
    x = photo(size=(40, 36))
    r = deep_dream(model, x, "4", steps=3, lr=0.01, octaves=3, octave_scale=1.5, jitter=2)
    assert r.octave_sizes == [(18, 16), (27, 24), (40, 36)]  # 40/1.5 = 26.7 -> 27 -> 18; 36 -> 24 -> 16
    seen = list(dict.fromkeys(model[0].sizes))
    assert seen[:3] == [(18, 16), (27, 24), (40, 36)]  # the steps ran at those sizes, smallest first
    assert [len(h) for h in r.history] == [3, 3, 3] and r.images.shape == (1, 3, 40, 36)


def test_one_step_is_the_normalized_l2_ascent_step() -> None:
    """x1 = x0 + lr * g / mean|g| with g = d(1/2 ||A||^2)/dx, checked against a float64 autograd computation."""
    model = small_net(1)
    x0 = photo(2, (16, 16), seed=1)
    lr = 1e-3
    r = deep_dream(model, x0, "4", steps=1, lr=lr, octaves=1, jitter=0)
    net = small_net(1).double()
    x = x0.double().requires_grad_(True)
    (0.5 * net(x).pow(2).flatten(1).sum(1)).sum().backward()
    g = x.grad
    expected = x0.double() + lr * g / g.abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    torch.testing.assert_close(r.x.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mean_abs_normalized(g).abs().flatten(1).mean(1), torch.ones(2, dtype=torch.float64))
    with torch.no_grad():
        a = net(x0.double())
    torch.testing.assert_close(activation_l2("4")({"4": a}), 0.5 * a.pow(2).flatten(1).sum(1))
    torch.testing.assert_close(r.norm_before.double(), a.flatten(1).norm(dim=1), rtol=1e-5, atol=1e-5)


def test_layer_norm_grows_over_the_steps() -> None:
    model = small_net(2)
    x = photo(size=(32, 32), seed=2)
    r = deep_dream(model, x, "4", steps=15, lr=0.02, octaves=2, octave_scale=1.4, jitter=4)
    assert float(r.norm_after[0]) > 2 * float(r.norm_before[0])
    for h in r.history:  # measured on the jittered images: monotone but for the odd shift
        assert float((h[1:, 0] > h[:-1, 0]).float().mean()) >= 0.7 and float(h[-1, 0]) > float(h[0, 0])
    still = deep_dream(model, x, "4", steps=15, lr=0.02, octaves=2, jitter=0)
    for h in still.history:  # without jitter every step increases the objective
        assert bool((h[1:, 0] > h[:-1, 0]).all())
    assert float(still.norm_after[0]) > 2 * float(still.norm_before[0])


def test_output_stays_in_the_models_input_range() -> None:
    model = small_net(3)
    model.preprocess = Preprocess(mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))
    rgb = photo(size=(24, 24), seed=3)
    x = model.preprocess.normalize(rgb)
    r = deep_dream(model, x, "2", steps=10, lr=0.2, octaves=2, jitter=3)  # large steps: clipping is needed
    lo = model.preprocess.normalize(torch.zeros(1, 3, 1, 1))
    hi = model.preprocess.normalize(torch.ones(1, 3, 1, 1))
    assert bool(((r.x >= lo - 1e-5) & (r.x <= hi + 1e-5)).all())
    assert float(r.images.min()) >= 0 and float(r.images.max()) <= 1
    assert bool((r.images < 1e-4).any() | (r.images > 1 - 1e-4).any())  # the box was reached
    torch.testing.assert_close(model.preprocess.denormalize(r.x).clamp(0, 1), r.images)


def test_model_unchanged_and_bad_input_refused() -> None:
    model = small_net(4).train()
    model[1].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deep_dream(model, photo(), "4", steps=2, octaves=2)
    assert model.training and not model[1].weight.requires_grad and model[3].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    bad = [dict(octave_scale=1.0), dict(octaves=0), dict(octaves=9), dict(jitter=-1), dict(lr=0), dict(steps=-2)]
    for kwargs in bad:
        with pytest.raises(ConvscopeError) as e:
            deep_dream(model, photo(), "4", **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(ConvscopeError, match="N x 3 x H x W"):
        deep_dream(model, photo()[0], "4")
    with pytest.raises(ConvscopeError, match="unknown layer"):
        deep_dream(model, photo(), "relu9")
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_dream_report_writes_before_after_page(tmp_path) -> None:
    path = save_png(photo(size=(40, 40))[0], tmp_path / "photo.png")
    run = dream_report(small_net(5), path, tmp_path / "out", "4", steps=3, octaves=2, jitter=2, size=32)
    assert run.before.is_file() and run.after.is_file() and run.result.images.shape == (1, 3, 32, 32)
    page = run.html.read_text()
    assert "before.png" in page and "after.png" in page and "Octaves" in page
    data = json.loads(run.json.read_text())
    assert data["octaves"] == 2 and [r["size"] for r in data["octaves_run"]] == [[23, 23], [32, 32]]
    assert data["norm_after"] == pytest.approx(float(run.result.norm_after[0]))
    (tmp_path / "two").mkdir()
    for name in ("a.png", "b.png"):
        save_png(photo(size=(40, 40))[0], tmp_path / "two" / name)
    with pytest.raises(ConvscopeError, match="names 2 images"):
        dream_report(small_net(5), tmp_path / "two", tmp_path / "o2", "4")
