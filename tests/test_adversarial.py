"""Adversarial examples: FGSM / PGD against closed forms on a linear model, budgets respected, attacks work on the
zoo models; feature-map comparison against a hand computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convscope as cs
from convscope.core.images import Preprocess
from convscope.methods.adversarial import feature_change, fgsm, pgd


class Linear(nn.Module):
    """z = W vec(x) + b on 3 x 4 x 4 images: d CE(z, y) / d x = W^T (softmax(z) - e_y) in closed form."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(48, classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(classes, 48, generator=g))
            self.fc.bias.copy_(torch.randn(classes, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def _ce_grad(model: Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z = model(x)
    p = F.softmax(z, 1) - F.one_hot(y, z.shape[1]).float()
    return (p @ model.fc.weight).view_as(x)


def _pixels(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 0.6 + 0.2  # away from 0 and 1


def test_fgsm_is_eps_times_sign_of_the_loss_gradient():
    model, x = Linear(), _pixels()
    y = model(x).argmax(1)
    res = fgsm(model, x, eps=0.01, preprocess=Preprocess.identity())
    torch.testing.assert_close(res.delta, 0.01 * _ce_grad(model, x, y).sign())
    assert torch.equal(res.label, y)
    # targeted: one step down the loss of the target class
    t = (y + 1) % 3
    res_t = fgsm(model, x, target=t.tolist(), eps=0.01, targeted=True, preprocess=Preprocess.identity())
    torch.testing.assert_close(res_t.delta, -0.01 * _ce_grad(model, x, t).sign())


def test_budget_is_in_pixel_units_through_the_models_normalization():
    pre = Preprocess(mean=(0.5, 0.4, 0.3), std=(0.2, 0.5, 0.25))
    model, pixels = Linear(), _pixels()
    x = pre.normalize(pixels)
    res = fgsm(model, x, eps=0.02, preprocess=pre)
    # the sign of d J / d pixels equals the sign of d J / d input (std > 0): delta = eps * sign, in pixel units
    g = _ce_grad(model, x, model(x).argmax(1))
    torch.testing.assert_close(res.delta, 0.02 * g.sign())
    torch.testing.assert_close(pre.denormalize(res.x), pixels + res.delta)


def test_pgd_l2_single_step_closed_form_and_projection():
    model, x = Linear(), _pixels()
    y = model(x).argmax(1)
    g = _ce_grad(model, x, y)
    step = 0.05 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    res = pgd(model, x, eps=1.0, alpha=0.05, steps=1, norm="l2", random_start=False, preprocess=Preprocess.identity())
    torch.testing.assert_close(res.delta, step)
    # a step longer than the ball is projected back onto it
    res = pgd(model, x, eps=0.03, alpha=0.05, steps=1, norm="l2", random_start=False, preprocess=Preprocess.identity())
    torch.testing.assert_close(res.delta, step * 0.03 / 0.05)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_respects_the_ball_and_the_pixel_range(norm):
    model = Linear()
    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(2))  # pixels touching 0 and 1
    eps = 0.05 if norm == "linf" else 0.3
    res = pgd(model, x, eps=eps, steps=5, norm=norm, preprocess=Preprocess.identity())
    adv = x + res.delta
    assert adv.min() >= 0 and adv.max() <= 1
    size = res.delta.abs().flatten(1).amax(1) if norm == "linf" else res.delta.flatten(1).norm(dim=1)
    assert (size <= eps + 1e-6).all()
    # the attack increases the loss of the clean class on every image
    y = model(x).argmax(1)
    assert (F.cross_entropy(model(res.x), y, reduction="none") > F.cross_entropy(model(x), y, reduction="none")).all()


def test_pgd_flips_efficientnet_on_a_photo_and_reports_steps(lite0):
    x = cs.load_images([cs.sample_image("chelsea")], lite0)
    res = pgd(lite0, x, eps=2 / 255, steps=5)
    assert res.success.all() and res.adv_class[0] != res.clean_class[0]
    assert 1 <= int(res.steps[0]) <= 5
    assert res.delta.abs().max() <= 2 / 255 + 1e-6
    # targeted, to an unrelated class
    tgt = cs.pgd(lite0, x, target=[954], eps=4 / 255, steps=8, targeted=True)  # 954: banana
    assert bool(tgt.success[0]) and int(tgt.adv_class[0]) == 954


def test_feature_change_by_hand():
    class Id(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Identity()

        def forward(self, x):
            return self.layer(x).mean((2, 3))

    a = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    b = a.clone()
    b[0, 1] += 0.5
    b[1, 2] *= 3
    a[1, 0] *= 0.01  # a nearly silent unit: its change is measured against the layer's median unit
    b[1, 0] = a[1, 0] + 0.001
    fc = feature_change(Id(), a, b, "layer")
    norms = [[float(torch.sqrt(((b[i, k] - a[i, k]) ** 2).sum())) for k in range(3)] for i in range(2)]
    base = [[float(torch.sqrt((a[i, k] ** 2).sum())) for k in range(3)] for i in range(2)]
    expect = torch.tensor([[norms[i][k] / max(base[i][k], sorted(base[i])[1]) for k in range(3)] for i in range(2)])
    torch.testing.assert_close(fc.change, expect, rtol=1e-4, atol=1e-6)
    assert fc.top_units(1).flatten().tolist() == [1, 2]
    assert fc.change[1, 0] < 0.01  # the silent unit's tiny wiggle does not rank


def test_adversarial_errors():
    model, x = Linear(), _pixels()
    with pytest.raises(cs.ConvscopeError, match="norm"):
        pgd(model, x, norm="l1", preprocess=Preprocess.identity())
    with pytest.raises(cs.ConvscopeError, match="eps"):
        pgd(model, x, eps=0, preprocess=Preprocess.identity())
    with pytest.raises(cs.ConvscopeError, match="one class per image"):
        pgd(model, x, target=cs.top_k(2), preprocess=Preprocess.identity())
    with pytest.raises(cs.LayerNotFoundError):
        feature_change(model, x, x, "nope")


def test_cli_writes_pictures_report_and_numbers(tmp_path, capsys):
    import json

    from PIL import Image

    from convscope.cli import main

    img = str(cs.sample_image("coffee"))
    assert main(["adversarial", img, "--model", "demo_net", "--device", "cpu", "--eps", "8/255", "--steps", "3",
                 "--units", "3", "--layer", "features.relu3", "--out", str(tmp_path)]) == 0
    assert "coffee.png:" in capsys.readouterr().out
    data = json.loads((tmp_path / "adversarial.json").read_text())
    row = data["images"][0]
    assert data["layer"] == "features.relu3" and abs(data["eps"] - 8 / 255) < 1e-12
    assert row["linf"] <= 8 / 255 + 1e-6 and len(row["top_units"]) == 3
    changes = [u["relative_change"] for u in row["top_units"]]
    assert changes == sorted(changes, reverse=True)
    assert Image.open(tmp_path / "adversarial.png").size[0] > 3 * 112
    assert Image.open(tmp_path / "features_coffee.png").size[1] > 3 * 96
    page = (tmp_path / "adversarial.html").read_text()  # the page links its two PNGs (HtmlReport default)
    assert 'src="adversarial.png"' in page and 'src="features_coffee.png"' in page
    # bad input: a clear one-line error, exit 2
    assert main(["adversarial", img, "--model", "demo_net", "--targeted", "--out", str(tmp_path)]) == 2
    assert "--targeted needs --target" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["adversarial", img, "--eps", "eight"])
