"""Exported models: a torch.export archive (.pt2) loads with the original layer names and every layer method gives
the eager model's numbers on it; a TorchScript archive keeps the layer-free methods and every layer method refuses
it in one line."""

from __future__ import annotations

import zipfile

import pytest
import torch
from torch import nn

import convscope as cs
from convscope.models.exported import export_model, is_export_archive, name_map, refuse_scripted

from .helpers import assert_untouched, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny inputs: a second thread only adds contention

class Block(nn.Module):
    """A residual block whose single ReLU module runs twice, as torchvision's BasicBlock."""

    def __init__(self, c: int, inplace: bool) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class TinyResNet(nn.Module):
    def __init__(self, inplace: bool = False, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace))
        self.layer1 = nn.Sequential(Block(8, inplace), Block(8, inplace))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layer1(self.stem(x))), 1))


def tiny(inplace: bool = False) -> TinyResNet:
    torch.manual_seed(0)
    net = TinyResNet(inplace)
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def res(tmp_path_factory, x):
    """The tiny residual net, its .pt2 export (dynamic batch and size) and its TorchScript trace, loaded back."""
    root = tmp_path_factory.mktemp("res")
    net = tiny()
    export_model(net, root / "res.pt2", example=x)
    torch.jit.trace(net, x).save(str(root / "res.pt"))
    return net, cs.load_model(str(root / "res.pt2"), device="cpu"), cs.load_model(str(root / "res.pt"), device="cpu")


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory, demo):
    root = tmp_path_factory.mktemp("demo")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    export_model(demo, root / "demo.pt2", example=x)
    torch.jit.script(demo).save(str(root / "demo.pt"))
    return cs.load_model(str(root / "demo.pt2"), device="cpu"), cs.load_model(str(root / "demo.pt"), device="cpu")


# --------------------------------------------------------------------------- .pt2: names, types, metadata


def test_pt2_keeps_every_layer_name_and_type(res, demo, demo_files, x):
    net, pt2, _ = res
    assert is_export_archive  # the loader's detector is public
    for eager, exported, size in ((net, pt2, 32), (demo, demo_files[0], 64)):
        assert [n for n, _ in exported.named_modules()] == [n for n, _ in eager.named_modules()]
        rows_e = cs.list_layers(eager, input_size=size)
        rows_x = cs.list_layers(exported, input_size=size)
        assert [(r.name, r.type, r.output_shape, r.calls) for r in rows_x] == \
            [(r.name, r.type, r.output_shape, r.calls) for r in rows_e]
        assert {n: n for n, _ in eager.named_modules() if n} == name_map(eager, exported, x)
    assert "layer1.0.relu:1" in [r.name for r in cs.list_layers(pt2, input_size=32)]  # shared calls are listed
    assert pt2.fc.original_type == "torch.nn.modules.linear.Linear"


def test_pt2_carries_preprocess_classes_and_zoo_name(demo, demo_files):
    pt2 = demo_files[0]
    assert pt2.preprocess == demo.preprocess and pt2.classes == demo.classes and pt2.zoo_name == "demo_net"
    xd = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(3))  # another batch and size
    torch.testing.assert_close(pt2(xd), demo(xd), rtol=1e-5, atol=1e-5)


def test_aliased_module_maps_to_its_eager_call(tmp_path):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.act, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Linear(4, 2)
            self.alias = self.act  # one module object, two attribute names

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.alias(self.act(self.conv(x)) - 0.1).mean((2, 3)))

    net = Net().eval()
    xx = torch.randn(2, 3, 8, 8)
    export_model(net, tmp_path / "alias.pt2", example=xx)
    pt2 = cs.load_model(str(tmp_path / "alias.pt2"))
    mapping = name_map(net, pt2, xx)
    assert mapping["alias"] == "act:1" and mapping["act"] == "act:0" and mapping["conv"] == "conv"
    with cs.probe(net, ["act:0", "act:1"]) as pe, torch.no_grad():
        net(xx)
    with cs.probe(pt2, ["act", "alias"]) as px, torch.no_grad():
        pt2(xx)
    torch.testing.assert_close(px.activations["alias"], pe.activations["act:1"])
    torch.testing.assert_close(px.activations["act"], pe.activations["act:0"])


# --------------------------------------------------------------------------- .pt2: methods equal the eager model's


def test_pt2_gradcam_topk_and_rules_equal_eager(res, x):
    net, pt2, _ = res
    before = snapshot(pt2)
    for layer in ("layer1", "layer1.1.relu:1", "layer1.0.relu:0"):
        ref = cs.gradcam(net, x, target=cs.top_k(2), layer=layer)
        torch.testing.assert_close(cs.gradcam(pt2, x, target=cs.top_k(2), layer=layer), ref, rtol=1e-5, atol=1e-7)
        assert ref.abs().max() > 0
    torch.testing.assert_close(cs.gradcam(pt2, x), cs.gradcam(net, x))  # same default layer
    torch.testing.assert_close(cs.gradcam_pp(pt2, x, layer="layer1"), cs.gradcam_pp(net, x, layer="layer1"))
    a, b = cs.top_k_activations(net, x, ["layer1.0", "layer1.1.relu:0"], k=2), \
        cs.top_k_activations(pt2, x, ["layer1.0", "layer1.1.relu:0"], k=2)
    for n in a:
        assert torch.equal(a[n].image_ids, b[n].image_ids) and torch.equal(a[n].locations, b[n].locations)
        torch.testing.assert_close(a[n].values, b[n].values)
    # the ReLU backward rules reach the exported graph's relu ops (rewritten from aten to torch functions)
    guided = cs.guided_backprop(pt2, x)
    torch.testing.assert_close(guided, cs.guided_backprop(net, x))
    assert not torch.allclose(guided, cs.gradient(pt2, x))
    torch.testing.assert_close(cs.deconvnet_rule(pt2, x), cs.deconvnet_rule(net, x))
    torch.testing.assert_close(cs.deconvnet(pt2, x, "layer1.0", [0, 3]),
                               cs.deconvnet(net, x, "layer1.0", [0, 3], path="autograd"))
    assert_untouched(pt2, before)


def gradients_and_occlusion_agree(eager: nn.Module, other: nn.Module, xx: torch.Tensor) -> None:
    sal = cs.saliency(eager, xx)
    # the fill as a tensor in the model's input space: a TorchScript file carries no preprocess, so a grey level
    # in pixels would be normalized for the eager zoo model only
    fill = torch.zeros(())
    occ = cs.occlusion(eager, xx, window=16, stride=16, fill=fill)
    torch.testing.assert_close(cs.saliency(other, xx), sal, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(cs.occlusion(other, xx, window=16, stride=16, fill=fill).maps, occ.maps, rtol=1e-4,
                               atol=1e-6)
    assert sal.abs().max() > 0 and occ.maps.abs().max() > 0


def test_pt2_and_traced_gradients_and_occlusion_equal_eager(res, demo, demo_files, x):
    net, pt2, traced = res
    gradients_and_occlusion_agree(net, pt2, x)
    gradients_and_occlusion_agree(net, traced, x)
    gradients_and_occlusion_agree(demo, demo_files[0], torch.randn(1, 3, 64, 64))


def test_scripted_gradients_and_occlusion_equal_eager(tmp_path, demo, demo_files, x):
    # torch.jit.script keeps ReLU.inplace as a constant the probe cannot set (traced modules drop it)
    gradients_and_occlusion_agree(demo, demo_files[1], torch.randn(1, 3, 64, 64))
    net = tiny(inplace=True)
    torch.jit.script(net).save(str(tmp_path / "inplace.pt"))
    gradients_and_occlusion_agree(net, cs.load_model(str(tmp_path / "inplace.pt")), x)


# --------------------------------------------------------------------------- TorchScript: layer methods refuse


def test_refuse_scripted_names_the_fix(res):
    _, _, ts = res
    with pytest.raises(cs.ConvscopeError) as err:
        refuse_scripted(ts, {"layer1": ts.layer1})
    msg = str(err.value)
    assert "\n" not in msg and "'layer1'" in msg and "TorchScript" in msg and ".pt2" in msg and "--weights" in msg
    with pytest.raises(cs.ConvscopeError, match="backward rules .* TorchScript"):
        refuse_scripted(ts, (), rules=True)
    refuse_scripted(ts)  # no layer, no rule: the gradient methods go on
    refuse_scripted(tiny(), ["layer1"], rules=True)  # an eager model passes
    wrapped = nn.Sequential(ts)  # TorchScript inside an eager container
    with pytest.raises(cs.ConvscopeError, match="TorchScript"):
        refuse_scripted(wrapped, {"0.layer1": ts.layer1})


@pytest.mark.parametrize("method", ["gradcam", "top_k", "guided_backprop", "list_layers"])
def test_layer_methods_refuse_torchscript_in_one_line(res, x, method):
    _, _, ts = res
    before = snapshot(ts)
    calls = {"gradcam": lambda: cs.gradcam(ts, x, layer="layer1"),
             "top_k": lambda: cs.top_k_activations(ts, x, "layer1", k=1),
             "guided_backprop": lambda: cs.guided_backprop(ts, x),
             "list_layers": lambda: cs.list_layers(ts, input_size=32)}
    with pytest.raises(cs.ConvscopeError) as err:
        calls[method]()
    assert "\n" not in str(err.value) and "TorchScript" in str(err.value) and ".pt2" in str(err.value)
    assert_untouched(ts, before)


# --------------------------------------------------------------------------- bad input


def test_static_export_names_the_shape_it_takes(tmp_path, x):
    net = tiny()
    export_model(net, tmp_path / "static.pt2", example=x, dynamic=False)
    pt2 = cs.load_model(str(tmp_path / "static.pt2"))
    assert pt2.preprocess.input_size is not None  # the bare module's identity preprocess was stored
    torch.testing.assert_close(pt2(x), net(x))
    with pytest.raises(cs.ConvscopeError) as err:
        cs.saliency(pt2, x[:1])
    msg = str(err.value)
    assert "\n" not in msg and "2x3x32x32" in msg and "(1, 3, 32, 32)" in msg and "dynamic_shapes" in msg
    with pytest.raises(cs.ConvscopeError, match="runs more than once") as err:  # a hook's error stays one line
        cs.gradcam(pt2, x, layer="layer1.0.relu")
    assert "\n" not in str(err.value)


def test_training_mode_export_and_bad_archives_are_refused(tmp_path, x):
    net = tiny().train()
    torch.export.save(torch.export.export(net, (x,)), str(tmp_path / "train.pt2"))
    with pytest.raises(cs.ModelLoadError, match="training mode.*eval"):
        cs.load_model(str(tmp_path / "train.pt2"))
    with zipfile.ZipFile(tmp_path / "other.pt2", "w") as z:
        z.writestr("a/b.txt", "x")
    with pytest.raises(cs.ModelLoadError, match="not a torch.export archive"):
        cs.load_model(str(tmp_path / "other.pt2"))
    export_model(tiny(), tmp_path / "ok.pt2", example=x)
    with pytest.raises(cs.ModelLoadError, match="torch.export archive .* load it as the model"):
        cs.load_model("demo_net", weights=tmp_path / "ok.pt2")
    assert net.training and all(m.training for m in net.modules())  # export_model restores the mode


def test_pt2_with_weights_file(tmp_path, x):
    export_model(tiny(), tmp_path / "net.pt2", example=x)
    other = TinyResNet()
    torch.save(other.state_dict(), tmp_path / "w.pt")
    pt2 = cs.load_model(str(tmp_path / "net.pt2"), weights=tmp_path / "w.pt")
    torch.testing.assert_close(pt2(x), other.eval()(x))
