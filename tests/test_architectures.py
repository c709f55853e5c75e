"""torchvision's architectures written without torchvision: keys, shapes, names, loading and forward semantics.

The key lists in tests/data/state_dict_keys/ come from real torchvision models (see each file's header), not from
our definitions. The forward semantics are checked piece by piece against float64 hand computations."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convscope as cs
from convscope.core.probe import probe
from convscope.errors import ModelLoadError
from convscope.models import convnext, densenet, mobilenetv3, resnet
from convscope.models.zoo import TORCHVISION_ARCHS

KEYS = Path(__file__).parent / "data" / "state_dict_keys"
NAMES = ["resnet18", "resnet50", "vgg16", "densenet121", "mobilenet_v3_large", "convnext_tiny"]
# torchvision's published parameter counts (weights meta "num_params")
PUBLISHED = {"resnet18": 11_689_512, "resnet50": 25_557_032, "vgg16": 138_357_544, "densenet121": 7_978_856,
             "mobilenet_v3_large": 5_483_032, "convnext_tiny": 28_589_128}

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def reference(name: str) -> dict[str, tuple[int, ...]]:
    """``key -> shape`` from the reference list (``scalar`` = a 0-dim tensor)."""
    rows = [ln.split() for ln in (KEYS / f"{name}.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    return {k: () if s == "scalar" else tuple(int(d) for d in s.split("x")) for k, s in rows}


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 1) -> dict[str, torch.Tensor]:
    """Random tensors of the given shapes; the big ones (VGG's fc6 alone is 400 MB) are one random row repeated,
    which torch.save stores as that row only."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.randint(0, 1000, (), generator=g)
        elif torch.Size(shape).numel() > 1 << 20:
            out[k] = torch.rand(shape[-1], generator=g).expand(shape)
        else:
            out[k] = torch.rand(shape, generator=g) + (0.5 if k.endswith("running_var") else -0.5)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_keys_shapes_load_and_forward(name, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="convscope.models"):
        model = cs.load_model(name, device="cpu")
    warned = [r for r in caplog.records if r.name == "convscope.models"]
    assert len(warned) == 1 and "random weights" in warned[0].getMessage()
    assert "\n" not in warned[0].getMessage() and f"weights='{name}.pth'" in warned[0].getMessage()
    assert not model.training and model.zoo_name == name and model.pretrained is False
    assert len(model.classes) == 1000 and model.preprocess.crop == 224
    assert model.preprocess.mean == (0.485, 0.456, 0.406) and model.preprocess.std == (0.229, 0.224, 0.225)

    ref = reference(name)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert own == ref, (sorted(set(own) ^ set(ref))[:5], [k for k in own if own[k] != ref.get(k)][:5])
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]

    with torch.no_grad():
        y = model(torch.rand(1, 3, 64, 64))  # 64 px: 2x2 final maps, adaptive pooling does the rest
    assert y.shape == (1, 1000) and torch.isfinite(y).all()

    state = random_state(ref)
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    loaded = cs.load_model(name, weights=path, device="cpu")
    assert loaded.pretrained is True and not loaded.training
    got = loaded.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())


def test_wrong_key_is_one_line_error(tmp_path):
    state = random_state(reference("resnet18"))
    state["layer1.0.bn1.weights"] = state.pop("layer1.0.bn1.weight")
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ModelLoadError) as err:
        cs.load_model("resnet18", weights=path, device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and "layer1.0.bn1.weight" in msg and "layer1.0.bn1.weights" in msg
    assert "do not fit" in msg


def test_wrong_shape_is_one_line_error(tmp_path):
    state = random_state(reference("mobilenet_v3_large"))
    state["features.4.block.2.fc1.weight"] = torch.zeros(32, 72, 1, 1)  # torchvision's squeeze width is 24
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match=r"features\.4\.block\.2\.fc1\.weight") as err:
        cs.load_model("mobilenet_v3_large", weights=path, device="cpu")
    assert "\n" not in str(err.value)


def test_legacy_checkpoints_and_prefix_load(tmp_path):
    """torchvision's original DenseNet files use ``norm.1``-style keys and predate ``num_batches_tracked``;
    DataParallel checkpoints carry ``module.``. torchvision itself loads all of them."""
    ref = reference("densenet121")
    state = {k: v for k, v in random_state(ref).items() if not k.endswith("num_batches_tracked")}
    legacy = {"module." + k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v for k, v in state.items()}
    assert any(".norm.1." in k for k in legacy) and any(".conv.2." in k for k in legacy)
    path = tmp_path / "densenet121-legacy.pth"
    torch.save(legacy, path)
    model = cs.load_model("densenet121", weights=path, device="cpu")
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())
    assert int(got["features.norm0.num_batches_tracked"]) == 0


def test_fine_tuned_head_sets_classes(tmp_path):
    ref = reference("resnet18")
    ref["fc.weight"], ref["fc.bias"] = (10, 512), (10,)
    path = tmp_path / "r18-10.pth"
    torch.save(random_state(ref), path)
    model = cs.load_model("resnet18", weights=path, device="cpu")
    assert model.classes == tuple(f"class {i}" for i in range(10))
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert resnet.resnet18(num_classes=7).fc.out_features == 7


def test_seeded_random_weights_leave_global_rng(caplog):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = cs.load_model("mobilenet_v3_large", device="cpu")
    after = torch.rand(1)
    b = cs.load_model("mobilenet_v3_large", device="cpu")
    assert torch.equal(before, after), "building the model must not consume the caller's random numbers"
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_torchvision_module_names():
    """Names read from torchvision's sources, beyond the state-dict keys (parameter-free modules)."""
    expected = {
        "resnet50": ["relu", "maxpool", "layer1.0.relu", "layer2.0.downsample.0", "layer4.2.bn3", "avgpool", "fc"],
        "vgg16": ["features.1", "features.4", "features.30", "avgpool", "classifier.2", "classifier.6"],
        "densenet121": ["features.relu0", "features.pool0", "features.denseblock1.denselayer1.relu1",
                        "features.denseblock4.denselayer16.relu2", "features.transition3.pool", "features.norm5"],
        "mobilenet_v3_large": ["features.0.2", "features.4.block.2.avgpool", "features.4.block.2.activation",
                               "features.4.block.2.scale_activation", "features.16.2", "classifier.1",
                               "classifier.2"],
        "convnext_tiny": ["features.0.1", "features.1.0.block.1", "features.1.0.block.4", "features.1.0.block.6",
                          "features.1.0.stochastic_depth", "features.2.0", "classifier.1"],
    }
    types = {"layer1.0.relu": nn.ReLU, "features.30": nn.MaxPool2d, "features.transition3.pool": nn.AvgPool2d,
             "features.4.block.2.scale_activation": nn.Hardsigmoid, "features.0.2": nn.Hardswish,
             "features.1.0.block.4": nn.GELU, "features.0.1": convnext.LayerNorm2d}
    built = {}
    for name, names in expected.items():
        with torch.device("meta"):
            built[name] = modules = dict(TORCHVISION_ARCHS[name].factory(1000).named_modules())
        for n in names:
            assert n in modules, f"{name}: {n}"
            if n in types:
                assert isinstance(modules[n], types[n]), (name, n, type(modules[n]))
    vgg, dense = built["vgg16"], built["densenet121"]
    assert all(vgg[f"features.{i}"].inplace for i in (1, 3, 29)) and vgg["classifier.1"].inplace
    assert not any(n.startswith("features.norm5.") or n == "features.relu5" for n in dense)


def bn64(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode batch norm by hand."""
    shape = (1, -1, 1, 1)
    return ((x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.rand(v.shape, generator=g, dtype=v.dtype) + (0.5 if "running_var" in k else -0.5))
    return model.eval().double()


def test_bottleneck_by_hand():
    """y = relu(bn3(conv3(relu(bn2(conv2_s(relu(bn1(conv1 x))))))) + bn(conv_s(x))), stride on the 3x3."""
    down = nn.Sequential(resnet.conv1x1(8, 16, 2), nn.BatchNorm2d(16))
    block = randomize(resnet.Bottleneck(8, 4, stride=2, downsample=down))
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    h = F.relu(bn64(block.bn1, F.conv2d(x, block.conv1.weight)))
    h = F.relu(bn64(block.bn2, F.conv2d(h, block.conv2.weight, stride=2, padding=1)))
    h = bn64(block.bn3, F.conv2d(h, block.conv3.weight))
    short = bn64(down[1], F.conv2d(x, down[0].weight, stride=2))
    with torch.no_grad():
        assert torch.allclose(block(x), F.relu(h + short), atol=1e-12)
    calls = []
    block.relu.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    with torch.no_grad():
        block(x)
    assert len(calls) == 3, "torchvision reuses one ReLU module three times in a Bottleneck"


def test_hooked_block_outputs_are_not_overwritten():
    """torchvision adds the shortcut in place; ours must not rewrite a captured bn2 output (detach=True shares)."""
    block = randomize(resnet.BasicBlock(4, 4))
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    expected = bn64(block.bn2, F.conv2d(F.relu(bn64(block.bn1, F.conv2d(x, block.conv1.weight, padding=1))),
                                         block.conv2.weight, padding=1))
    with probe(block, ["bn2"], detach=True) as p, torch.no_grad():
        block(x)
    assert torch.allclose(p.activations["bn2"], expected, atol=1e-12)


def test_dense_block_concatenates_by_hand():
    block = randomize(densenet.DenseBlock(num_layers=3, num_input_features=5, bn_size=2, growth_rate=3))
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    feats = [x]
    for i in range(3):
        layer = block[f"denselayer{i + 1}"]
        h = torch.cat(feats, 1)
        h = F.conv2d(F.relu(bn64(layer.norm1, h)), layer.conv1.weight)
        feats.append(F.conv2d(F.relu(bn64(layer.norm2, h)), layer.conv2.weight, padding=1))
    with torch.no_grad():
        y = block(x)
    assert y.shape == (2, 5 + 3 * 3, 6, 6)
    assert torch.allclose(y, torch.cat(feats, 1), atol=1e-12)
    assert torch.equal(y[:, :5], x), "the block input passes through unchanged (first channels)"


def test_squeeze_excitation_and_residual_by_hand():
    spec = mobilenetv3.BlockSpec(8, 3, 16, 8, True, True, 1)
    block = randomize(mobilenetv3.InvertedResidual(spec))
    assert mobilenetv3.make_divisible(72 // 4) == 24 and mobilenetv3.make_divisible(120 // 4) == 32
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    expand, dw, se, project = block.block

    def hswish(t: torch.Tensor) -> torch.Tensor:
        return t * torch.clamp(t + 3, 0, 6) / 6

    h = hswish(bn64(expand[1], F.conv2d(x, expand[0].weight)))
    h = hswish(bn64(dw[1], F.conv2d(h, dw[0].weight, padding=1, groups=16)))
    s = h.mean((2, 3), keepdim=True)
    s = F.conv2d(F.relu(F.conv2d(s, se.fc1.weight, se.fc1.bias)), se.fc2.weight, se.fc2.bias)
    h = h * torch.clamp(s / 6 + 0.5, 0, 1)
    h = bn64(project[1], F.conv2d(h, project[0].weight))
    with torch.no_grad():
        assert torch.allclose(block(x), h + x, atol=1e-12)
    assert project[1].eps == 1e-3 and project[1].momentum == 0.01 and len(project) == 2


def test_convnext_block_by_hand():
    block = randomize(convnext.CNBlock(6, layer_scale=0.5, stochastic_depth_prob=0.3))
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    dw, _, ln, fc1, _, fc2, _ = block.block
    h = F.conv2d(x, dw.weight, dw.bias, padding=3, groups=6)
    mu, var = h.mean(1, keepdim=True), h.var(1, unbiased=False, keepdim=True)
    h = (h - mu) / torch.sqrt(var + 1e-6) * ln.weight.view(1, -1, 1, 1) + ln.bias.view(1, -1, 1, 1)
    h = torch.einsum("nchw,dc->ndhw", h, fc1.weight) + fc1.bias.view(1, -1, 1, 1)
    h = 0.5 * h * (1 + torch.erf(h / 2 ** 0.5))
    h = torch.einsum("nchw,dc->ndhw", h, fc2.weight) + fc2.bias.view(1, -1, 1, 1)
    with torch.no_grad():
        assert torch.allclose(block(x), x + block.layer_scale * h, atol=1e-12), "eval: stochastic depth is identity"
        norm = convnext.LayerNorm2d(6, eps=1e-6).double()
        norm.weight.uniform_(), norm.bias.uniform_()
        z = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-6)
        assert torch.allclose(norm(x), z * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1), atol=1e-12)
        drop = convnext.StochasticDepth(0.5).train()
        torch.manual_seed(0)
        y = drop(torch.ones(64, 3, 2, 2))
    kept = y.flatten(1)
    assert set(kept.unique().tolist()) <= {0.0, 2.0} and (kept == kept[:, :1]).all(), "whole rows, scaled 1/(1-p)"
    with torch.device("meta"):
        model = convnext.convnext_tiny()
    probs = [m.p for m in model.modules() if isinstance(m, convnext.StochasticDepth)]
    assert len(probs) == 18 and probs[0] == 0.0 and probs[-1] == pytest.approx(0.1)
    assert model.features[1][0].layer_scale.shape == (96, 1, 1)
    assert torch.equal(convnext.CNBlock(4).layer_scale, torch.full((4, 1, 1), 1e-6))
