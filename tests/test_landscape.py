"""Loss landscape (Li et al. 2018): filter-normalized directions, grid values against hand computations, and the
weights restored bit for bit whatever happens."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convscope.errors import ConvscopeError
from convscope.methods.landscape import interpolate, loss_landscape, random_direction

from .helpers import assert_untouched, snapshot


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Dropout(0.5), nn.Linear(6 * 8 * 8, 4))
    with torch.no_grad():  # running statistics that differ from the defaults, so restoring them is tested
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.train()  # comes in train mode: the landscape must be evaluated in eval mode and the mode restored


def data(n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)


def eval_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The loss of an eval-mode copy in one batch, float64 accumulation (independent of the library)."""
    m = copy.deepcopy(net).eval()
    with torch.no_grad():
        return float(F.cross_entropy(m(x).double(), y))


def shifted(net: nn.Module, dirs: list[dict[str, torch.Tensor]], coords: tuple[float, ...]) -> nn.Module:
    m = copy.deepcopy(net)
    with torch.no_grad():
        for name, p in m.named_parameters():
            for c, d in zip(coords, dirs):
                p.add_(c * d[name])
    return m


def test_directions_are_filter_normalized_and_skip_biases_and_batch_norm():
    net = tiny_net()
    d = random_direction(net, seed=3)
    for name, p in net.named_parameters():
        if p.dim() == 1:  # conv/linear biases, BN weight and bias
            assert torch.count_nonzero(d[name]) == 0, name
        else:
            assert torch.allclose(d[name].double().flatten(1).norm(dim=1), p.double().flatten(1).norm(dim=1),
                                  rtol=1e-5), name
            assert not torch.allclose(d[name], p)  # a random direction, not the weights
    assert all(torch.equal(d[n], v) for n, v in random_direction(net, seed=3).items())  # reproducible
    assert not torch.equal(random_direction(net, seed=4)["0.weight"], d["0.weight"])


@pytest.mark.parametrize("dims", [1, 2])
def test_origin_is_the_model_loss_and_grid_points_match_a_hand_shifted_copy(dims):
    net, (x, y) = tiny_net(), data()
    before = snapshot(net)
    res = loss_landscape(net, x, y, dims=dims, steps=5, span=0.5, batch_size=8)
    assert_untouched(net, before)
    assert res.losses.shape == ((5,) if dims == 1 else (5, 5))
    assert res.origin_loss == pytest.approx(eval_loss(net, x, y), rel=1e-6)
    assert res.alphas.tolist() == [-0.5, -0.25, 0.0, 0.25, 0.5]
    idx, coords = ((4,), (0.5,)) if dims == 1 else ((0, 3), (-0.5, 0.25))
    expect = eval_loss(shifted(net, res.directions, coords), x, y)
    assert float(res.losses[idx]) == pytest.approx(expect, rel=1e-5)
    assert float(res.losses.max()) > res.origin_loss + 1e-3  # the directions move the loss
    assert res.nonfinite == 0


def test_given_directions_are_used_as_they_are():
    net, (x, y) = tiny_net(), data()
    d = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    d["6.bias"] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # raises the logit of class 0 only
    res = loss_landscape(net, x, y, dims=1, steps=3, span=2.0, directions=[d])
    m = copy.deepcopy(net)
    with torch.no_grad():
        m[6].bias[0] += 2.0
    assert float(res.losses[2]) == pytest.approx(eval_loss(m, x, y), rel=1e-6)
    with pytest.raises(ConvscopeError, match="shape"):
        loss_landscape(net, x, y, directions=[{**d, "6.bias": torch.zeros(3)}])
    with pytest.raises(ConvscopeError, match="no entry"):
        loss_landscape(net, x, y, directions=[{"6.bias": d["6.bias"]}])


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_weights_restored_bit_for_bit_when_the_loss_raises_midway(error):
    net, (x, y) = tiny_net(), data()
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] = -0.0  # a signed zero survives only a bitwise restore
    net[6].weight.grad = torch.full_like(net[6].weight, 0.25)
    before = snapshot(net)
    saw = []

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        saw.append((net.training, net[1].training, net[0].weight.detach().clone()))
        if len(saw) == 4:
            raise error("stop")
        return F.cross_entropy(out, target)

    with pytest.raises(error):
        loss_landscape(net, x, y, dims=2, steps=3, loss=loss, batch_size=10)
    assert not any(mode or bn for mode, bn, _ in saw)  # evaluated in eval mode
    assert any(not torch.equal(w, before.state["0.weight"]) for _, _, w in saw)  # the weights really moved
    assert_untouched(net, before)
    assert torch.signbit(net[0].weight[0, 0, 0, 0])
    assert net[0].weight.grad is None and net[6].weight.grad is not None


def test_interpolation_ends_are_the_checkpoints_and_midpoint_matches_hand_computation():
    net_a, net_b, (x, y) = tiny_net(0), tiny_net(1), data()
    holder = tiny_net(2)  # only lends the architecture
    before = snapshot(holder)
    res = interpolate(holder, net_a.state_dict(), net_b, x, y, steps=5, extent=(-0.5, 1.5), batch_size=7)
    assert_untouched(holder, before)
    assert res.alphas.tolist() == [-0.5, 0.0, 0.5, 1.0, 1.5]
    assert float(res.losses[1]) == pytest.approx(eval_loss(net_a, x, y), rel=1e-6)
    assert float(res.losses[3]) == pytest.approx(eval_loss(net_b, x, y), rel=1e-6)
    mid = copy.deepcopy(net_a)
    sa, sb = net_a.state_dict(), net_b.state_dict()
    mid.load_state_dict({k: (0.5 * sa[k] + 0.5 * sb[k]) if sa[k].is_floating_point() else sa[k] for k in sa})
    assert float(res.losses[2]) == pytest.approx(eval_loss(mid, x, y), rel=1e-5)


def test_bad_input_is_one_clear_error():
    net, (x, y) = tiny_net(), data()
    before = snapshot(net)
    for kwargs, match in [({"dims": 3}, "dims"), ({"steps": 1}, "steps"), ({"span": 0}, "span"),
                          ({"batch_size": 0}, "batch_size")]:
        with pytest.raises(ConvscopeError, match=match):
            loss_landscape(net, x, y, **kwargs)
    with pytest.raises(ConvscopeError, match="targets"):
        loss_landscape(net, x, y[:3])
    with pytest.raises(ConvscopeError, match="does not fit"):
        interpolate(net, net.state_dict(), nn.Linear(2, 2).state_dict(), x, y)
    with pytest.raises(ConvscopeError, match="scalar"):
        loss_landscape(net, x, y, steps=3, loss=lambda o, t: F.cross_entropy(o, t, reduction="none"))
    assert_untouched(net, before)


# --------------------------------------------------------------------------- the report page


def test_landscape_report_writes_contour_curve_interpolation_html_and_json(tmp_path):
    import json

    from convscope.applications.landscape_report import labelled_data, landscape_report

    from .helpers import linked_images

    net, (x, y) = tiny_net(), data()
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    xs, ys, _ = labelled_data(tmp_path / "data.pt", net)
    assert torch.equal(xs, x) and torch.equal(ys, y)
    before = snapshot(net)
    run = landscape_report(net, out=tmp_path / "land", data=str(tmp_path / "data.pt"), dims=2, steps=5, span=0.5,
                           other=tiny_net(1), batch_size=8)
    assert_untouched(net, before)
    page = json.loads(run.json.read_text())
    assert page["origin_loss"] == pytest.approx(eval_loss(net, x, y), rel=1e-6)
    assert len(page["losses"]) == 5 and len(page["losses"][0]) == 5
    inter = page["interpolation"]  # from the model itself (alpha 0) to another net: the model's own loss at alpha 0
    assert inter["alphas"] == [-0.5, 0.0, 0.5, 1.0, 1.5]
    assert inter["losses"][1] == pytest.approx(page["origin_loss"], rel=1e-9)
    assert inter["losses"][3] == pytest.approx(eval_loss(tiny_net(1), x, y), rel=1e-6)
    assert {p.name for p in linked_images(run.html)} == {"landscape_2d.png", "landscape_1d.png", "interpolation.png"}
    with pytest.raises(ConvscopeError, match="synthetic:N"):
        labelled_data("synthetic:0", net)
    with pytest.raises(ConvscopeError, match="no such file"):
        labelled_data(tmp_path / "missing.pt", net)


def test_pictures_show_overflowed_points_white_and_refuse_all_nonfinite():
    from convscope.applications.landscape_report import contour_picture, curve_picture
    from convscope.methods.landscape import LandscapeResult

    c = torch.linspace(-1, 1, 5, dtype=torch.float64)
    losses = 1 + c[:, None] ** 2 + c[None, :] ** 2
    losses[0, 0] = float("inf")  # alpha = -1, beta = -1: the bottom-left corner
    res = LandscapeResult(c, c.clone(), losses, [], 1.0)
    assert res.nonfinite == 1 and res.origin_loss == 1.0
    img = contour_picture(res, size=100).convert("RGB")
    left, top = 44, 8  # the plot's offsets without a title
    assert img.getpixel((left + 2, top + 97)) == (255, 255, 255)  # overflowed corner
    assert img.getpixel((left + 97, top + 97)) != (255, 255, 255)  # the finite corner is coloured
    curve = curve_picture(c, torch.tensor([1.0, float("nan"), 0.5, 1.0, 2.0]))
    assert curve.width > 100
    with pytest.raises(ConvscopeError, match="inf or NaN"):
        curve_picture(c, torch.full((5,), float("nan")))
