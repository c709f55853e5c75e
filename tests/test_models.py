"""Model zoo and loaders: strict weights, real predictions, every user-model source."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import textwrap

import pytest
import torch
from torch import nn

import convscope as cs
from convscope.models import efficientnet as eff
from convscope.models.zoo import ZOO


def _package_state(name: str) -> dict:
    pkg = importlib.import_module(ZOO[name].weights_package)
    from pathlib import Path

    path = next(Path(pkg.__file__).parent.glob("models/*.pth"))
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_weights_load_strictly(name):
    if not ZOO[name].available():
        pytest.skip(f"{ZOO[name].pip_name} not installed")
    state = _package_state(name)
    renamed = eff.rename_state_dict(state)
    assert len(renamed) == len(state), "renaming must be one-to-one"
    assert not any(k.startswith("_") for k in renamed), "every package key must map onto our names"
    model = eff.build(name)
    model.load_state_dict(renamed, strict=True)  # raises on any missing/unexpected key or shape mismatch
    for k, v in renamed.items():
        assert torch.equal(model.state_dict()[k], v)


def test_same_padding_matches_tf_rule():
    """TF SAME: output = ceil(in/stride); for 224 with k=3, s=2 the extra pad goes bottom/right."""
    conv = eff.SamePadConv2d(1, 1, 3, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    x = torch.ones(1, 1, 224, 224)
    y = conv(x)
    assert y.shape[-2:] == (112, 112)
    # top-left output sees rows/cols 0..2 (no pad at top/left): sum of 9 ones
    assert y[0, 0, 0, 0] == 9
    # bottom-right output sees rows 222, 223 and one padded row: 4 ones
    assert y[0, 0, -1, -1] == 4


def test_real_weights_predict_cat_and_coffee(lite0):
    x = cs.load_images([cs.sample_image("chelsea"), cs.sample_image("coffee")], lite0)
    cat, coffee = cs.predict(lite0, x, k=5)
    assert {p.index for p in cat} & {281, 282, 283, 284, 285}, [p.name for p in cat]
    assert {p.index for p in coffee} & {967, 968, 504}, [p.name for p in coffee]
    assert cat[0].probability > 0.2 and coffee[0].name == "espresso"


def test_zoo_model_carries_preprocess_and_classes(lite0):
    assert lite0.preprocess.input_size == (224, 224)
    assert len(lite0.classes) == 1000 and lite0.classes[281] == "tabby"
    # the TF-Lite normalization (x*255 - 127) / 128
    torch.testing.assert_close(lite0.preprocess.normalize(torch.ones(1, 3, 1, 1)), torch.full((1, 3, 1, 1), 1.0))


def test_demo_net_loads_with_random_weights_reproducibly(demo):
    again = cs.load_model("demo_net", device="cpu")
    for (k, a), b in zip(demo.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert 1_000_000 < sum(p.numel() for p in demo.parameters()) < 5_000_000
    out = demo(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, len(demo.classes))


def test_load_model_does_not_touch_global_rng():
    torch.manual_seed(123)
    a = torch.rand(3)
    torch.manual_seed(123)
    cs.load_model("demo_net", device="cpu")
    torch.testing.assert_close(torch.rand(3), a)


def test_module_object_is_returned_unchanged():
    net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU())
    assert cs.load_model(net) is net


def test_factory_with_weights_and_torchscript(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(textwrap.dedent("""
        from torch import nn
        def tiny():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mynets", None)
    src = importlib.import_module("mynets").tiny()
    torch.save(src.state_dict(), tmp_path / "w.pt")
    loaded = cs.load_model("mynets:tiny", weights=tmp_path / "w.pt", device="cpu")
    for a, b in zip(src.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    cs.load_model("mynets:tiny", weights=tmp_path / "ckpt.pt")
    scripted = torch.jit.script(src)
    scripted.save(str(tmp_path / "net.ts"))
    ts = cs.load_model(str(tmp_path / "net.ts"), device="cpu")
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(ts(x), src(x))


def test_bad_specs_give_clear_errors(tmp_path):
    with pytest.raises(cs.ModelLoadError, match="efficientnet_lite0"):
        cs.load_model("efficientnet_lite")
    with pytest.raises(cs.ModelLoadError, match="does not exist"):
        cs.load_model("demo_net", weights=tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(cs.ModelLoadError, match="junk.pt"):
        cs.load_model("demo_net", weights=tmp_path / "junk.pt")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(cs.ModelLoadError, match="do not fit"):
        cs.load_model("demo_net", weights=tmp_path / "other.pt")
    with pytest.raises(cs.ModelLoadError, match="no callable"):
        cs.load_model("json:nothing_here")
    with pytest.raises(cs.ModelLoadError, match="factory"):
        cs.load_model(str(tmp_path / "junk.pt"))
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(cs.ModelLoadError, match="pip install torchvision"):
            cs.load_model("torchvision:resnet18")
    if importlib.util.find_spec("timm") is None:
        with pytest.raises(cs.ModelLoadError, match="pip install timm"):
            cs.load_model("timm:resnet18")


def test_list_layers_shapes_and_units(demo):
    rows = {r.name: r for r in cs.list_layers(demo)}
    assert rows["features.conv1"].output_shape == (64, 56, 56) and rows["features.conv1"].units == 64
    assert rows["features.pool5"].output_shape == (128, 7, 7)
    assert rows["classifier.fc8"].output_shape == (len(demo.classes),)
    assert rows["features.conv2"].params == 128 * 64 * 25 + 128


def test_lite0_layers_are_unique_call_sites(lite0):
    """Every activation is its own module, called once: hooks never fire twice (unlike the public code)."""
    rows = cs.list_layers(lite0)
    acts = [r for r in rows if r.type == "ReLU6"]
    assert len(acts) == 2 + 15 * 2 + 1  # stem, head, and (expand + depthwise) per block (block 0 has no expand)
    assert all(r.calls == 1 for r in rows)
    assert {r.name: r for r in rows}["head.act"].output_shape == (1280, 7, 7)
