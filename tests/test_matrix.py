"""The architecture x method matrix: every method runs on every torchvision-named architecture of the zoo (random
weights: mechanics, not meaning) at 64 px with few steps, or raises the one-line ConvscopeError documented in
docs/models.md. Each architecture is built once per module.

``python -m tests.test_matrix`` runs every cell and writes the table into docs/models.md (between the
``matrix`` markers); ``test_docs_table_matches_expectations`` keeps that table equal to ``EXPECTED``.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import convscope as cs
from convscope.core.preprocess import Preprocess

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny inputs: a second thread only adds contention

SIZE = 64  # input side: every architecture keeps a 2 x 2 map at its last stage
DOC = Path(__file__).resolve().parent.parent / "docs" / "models.md"
START, END = "<!-- matrix:start -->", "<!-- matrix:end -->"


@dataclass(frozen=True)
class Arch:
    """Where to look in an architecture: the last stage (CAMs), a middle layer (top-k, projections, AM, inversion,
    dissection, explorer), the first convolution (atlas) and, for ResNets, a call of a shared block ReLU."""

    name: str
    last: str
    mid: str
    first: str
    shared: str | None = None  # "name:k"; the bare name must be refused


ARCHS: tuple[Arch, ...] = (
    Arch("resnet18", "layer4", "layer2", "conv1", "layer1.0.relu:1"),
    Arch("resnet50", "layer4", "layer2", "conv1", "layer2.0.relu:2"),
    Arch("vgg16", "features.29", "features.15", "features.0"),
    Arch("densenet121", "features.norm5", "features.transition1", "features.conv0"),
    Arch("mobilenet_v3_large", "features.16", "features.6", "features.0.0"),
    Arch("convnext_tiny", "features.7", "features.3", "features.0.0"),
    # ViT's CAM layer is the last block's ln_1 (layer="auto"'s choice): after the last attention only the class
    # token reaches the head, so the block's own output has exactly zero gradients on the patch grid
    Arch("vit_b_16", "encoder.layers.encoder_layer_11.ln_1", "encoder.layers.encoder_layer_5", "conv_proj"),
    Arch("swin_t", "features.7", "features.3", "features.0.0"),
)

METHODS = ("saliency", "smoothgrad", "guided_backprop", "deconvnet_rule", "cam", "gradcam", "gradcam_pp",
           "guided_gradcam", "occlusion", "deconvnet", "top_k", "am_channel", "am_logit", "invert", "dissect",
           "atlas", "explorer")

SLOW = {"atlas", "dissect", "explorer"}  # the whole-pipeline cells: run in the slow suite

# cells that raise a documented ConvscopeError: (arch, method) -> a pattern of its message (docs/models.md says why)
NOT_GAP = "CAM needs layer"
NO_RELU = {rule: f"relu_rule='{rule}' changed nothing" for rule in ("guided", "deconvnet")}
CLASS_TOKEN = "CAM needs the classifier to read the global average"
EXPECTED: dict[tuple[str, str], str] = {
    ("vgg16", "cam"): NOT_GAP,
    ("mobilenet_v3_large", "cam"): NOT_GAP,
    ("convnext_tiny", "guided_backprop"): NO_RELU["guided"],
    ("convnext_tiny", "guided_gradcam"): NO_RELU["guided"],
    ("convnext_tiny", "deconvnet_rule"): NO_RELU["deconvnet"],
    ("vit_b_16", "guided_backprop"): NO_RELU["guided"],
    ("vit_b_16", "guided_gradcam"): NO_RELU["guided"],
    ("vit_b_16", "deconvnet_rule"): NO_RELU["deconvnet"],
    ("vit_b_16", "cam"): CLASS_TOKEN,
    ("swin_t", "guided_backprop"): NO_RELU["guided"],
    ("swin_t", "guided_gradcam"): NO_RELU["guided"],
    ("swin_t", "deconvnet_rule"): NO_RELU["deconvnet"],
}

WHY = {
    NOT_GAP: "CAM (Zhou et al. 2016) needs the last feature maps global-average-pooled straight into the last linear "
             "layer; VGG-16's classifier (three linear layers on a 7x7 map) and MobileNetV3's (a 960 -> 1280 linear "
             "layer before the last one) are not that: use Grad-CAM there.",
    NO_RELU["guided"]: "ConvNeXt, ViT-B/16 and Swin-T have no ReLU (GELU only), so the guided ReLU rule would change "
                       "nothing and the result would be the plain gradient: the probe refuses instead of returning a "
                       "mislabelled saliency map.",
    NO_RELU["deconvnet"]: "the same for the DeconvNet ReLU rule.",
    CLASS_TOKEN: "ViT-B/16's head reads the class token after the last block, not a global average of the patch "
                 "grid, so no classifier row weights the patch map; CAM checks that premise (the logits must equal "
                 "the head applied to the patch map's mean) on token layers and refuses: use Grad-CAM there.",
}


# --------------------------------------------------------------------------- cells


def build(name: str) -> torch.nn.Module:
    """The zoo model with seeded random weights (a zero-initialized head made random), fed 64 px images (ImageNet
    normalization)."""
    arch = cs.load_model(name, device="cpu")
    arch.preprocess = Preprocess(resize=SIZE, crop=SIZE, mean=arch.preprocess.mean, std=arch.preprocess.std)
    head = [m for m in arch.modules() if isinstance(m, torch.nn.Linear)][-1]
    if not head.weight.any():  # ViT's zero-initialized head (torchvision's init): constant logits, zero gradients
        with torch.no_grad():
            head.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
    return arch


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def finite(t: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert tuple(t.shape) == shape, (tuple(t.shape), shape)
    assert torch.isfinite(t).all()


def cell(method: str, a: Arch, model: torch.nn.Module, tmp: Path, synth: Callable[[], Path]) -> None:
    """Run one method on one architecture and check the shape and finiteness of what it returns."""
    x = images(1)
    if method in ("saliency", "smoothgrad", "guided_backprop", "deconvnet_rule"):
        fn = {"saliency": cs.saliency, "guided_backprop": cs.guided_backprop, "deconvnet_rule": cs.deconvnet_rule,
              "smoothgrad": lambda m, xx: cs.smoothgrad(m, xx, n=2)}[method]
        out = fn(model, x)
        assert out.shape[0] == 1 and out.shape[-2:] == (SIZE, SIZE) and torch.isfinite(out).all()
        assert out.abs().sum() > 0
    elif method in ("cam", "gradcam", "gradcam_pp"):
        maps = getattr(cs, method)(model, x, target=cs.top_k(2), layer=a.last)
        finite(maps, (1, 2, SIZE, SIZE))
        if method == "gradcam":  # the layer reaches the logits (not so: a ViT block after its last attention)
            assert maps.amax() > 0
    elif method == "guided_gradcam":
        finite(cs.guided_gradcam(model, x, layer=a.last), (1, 1, 3, SIZE, SIZE))
    elif method == "occlusion":
        res = cs.occlusion(model, x, window=32, stride=32)
        finite(res.maps, (1, 1, SIZE, SIZE))  # (random MobileNetV3 features fade to ~1e-8: its maps are ~0)
    elif method == "deconvnet":
        finite(cs.deconvnet(model, x, a.mid, [0, 1]), (1, 2, 3, SIZE, SIZE))
    elif method == "top_k":
        layers = [a.mid] + ([a.shared] if a.shared else [])
        found = cs.top_k_activations(model, images(3, 1), layers, k=2, progress=False)
        for name in layers:
            assert found[name].values.shape[1] == 2 and torch.isfinite(found[name].values).all()
    elif method in ("am_channel", "am_logit"):
        layer = a.mid if method == "am_channel" else None
        res = cs.activation_maximization(model, layer, [0, 1], steps=2, size=SIZE, progress=False)
        finite(res.images, (2, 3, SIZE, SIZE))
    elif method == "invert":
        res = cs.invert(model, x, a.mid, steps=2, progress=False)
        assert res.images.shape[-2:] == (SIZE, SIZE) and torch.isfinite(res.images).all()
    elif method == "dissect":
        from convscope.methods.dissect import DissectConfig

        d = cs.dissect(model, synth(), a.mid, DissectConfig(workers=0, batch_size=8), progress=False)[a.mid]
        assert len(d.rows) == d.iou.shape[0] > 0
    elif method == "atlas":
        atlas = cs.build_atlas(model, [a.first], tmp / f"atlas-{a.name}", synthetic=4, k=1, am_steps=1,
                               am_size=32, progress=False)
        assert atlas is not None
    elif method == "explorer":
        from fastapi.testclient import TestClient

        from convscope.web import create_app

        with TestClient(create_app(model)) as client:
            names = [row["name"] for row in client.get("/api/layers").json()]
            layers = [next(n for n in names if n == a.mid or n.startswith(a.mid + "."))]  # containers are not listed
            layers += [a.shared] if a.shared else []
            assert set(layers) <= set(names)
            for path, params in (("/api/predict", {}), *(("/api/analyze", {"layer": n}) for n in layers),
                                 ("/api/cam", {})):
                r = client.get(path, params={"image": "sample-chelsea", **params})
                assert r.status_code == 200, (path, r.text)
    else:  # pragma: no cover
        raise AssertionError(method)


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Callable[[], Path]:
    """A tiny synthetic Broden set, generated on first use."""
    made: list[Path] = []

    def get() -> Path:
        if not made:
            from convscope.data import generate

            made.append(generate(tmp_path_factory.mktemp("synth") / "broden", n=8, size=SIZE, seed=7,
                                 progress=False))
        return made[0]
    return get


def model_for(models: dict[str, torch.nn.Module], name: str) -> torch.nn.Module:
    """Build each architecture once (and drop the previous one: VGG-16 alone holds 0.5 GB)."""
    if name not in models:
        models.clear()
        models[name] = build(name)
    return models[name]


CELLS = [pytest.param(a, m, id=f"{a.name}-{m}", marks=[pytest.mark.slow] if m in SLOW else [])
         for a in ARCHS for m in METHODS]


@pytest.mark.parametrize("arch,method", CELLS)
def test_cell(arch, method, models, synth, tmp_path):
    model = model_for(models, arch.name)
    expected = EXPECTED.get((arch.name, method))
    if expected is None:
        cell(method, arch, model, tmp_path, synth)
    else:
        with pytest.raises(cs.ConvscopeError, match=expected) as err:
            cell(method, arch, model, tmp_path, synth)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.shared], ids=lambda a: a.name)
def test_shared_relu_bare_name_is_refused(arch, models):
    model = model_for(models, arch.name)
    base = arch.shared.split(":")[0]
    with pytest.raises(cs.ConvscopeError, match=f"{re.escape(base)}:0 or {re.escape(base)}:1") as err:
        cs.gradcam(model, images(1), layer=base)
    assert "\n" not in str(err.value)
    rows = [r.name for r in cs.list_layers(model, input_size=SIZE) if r.name.startswith(base)]
    calls = 3 if arch.name == "resnet50" else 2
    assert rows == [base] + [f"{base}:{k}" for k in range(calls)]


def test_docs_table_matches_expectations():
    text = DOC.read_text()
    assert START in text and END in text, f"run `python -m tests.test_matrix` to write the table into {DOC}"
    assert text.split(START)[1].split(END)[0].strip() == table(outcomes_expected()).strip(), \
        "docs/models.md is out of date: run `python -m tests.test_matrix`"


# --------------------------------------------------------------------------- the table in docs/models.md


def outcomes_expected() -> dict[tuple[str, str], str]:
    return {(a.name, m): "ok" if (a.name, m) not in EXPECTED else f"error: {EXPECTED[(a.name, m)]}"
            for a in ARCHS for m in METHODS}


def table(outcomes: dict[tuple[str, str], str]) -> str:
    """Markdown: one row per method, one column per architecture; a failing cell shows its error's first words."""
    lines = ["| method | " + " | ".join(a.name for a in ARCHS) + " |", "|---" * (len(ARCHS) + 1) + "|"]
    for m in METHODS:
        lines.append(f"| {m} | " + " | ".join(outcomes[(a.name, m)] for a in ARCHS) + " |")
    notes = list(dict.fromkeys(EXPECTED.values()))
    lines.append("")
    lines += [f"* `{n}` ({', '.join(f'{a} {m}' for (a, m), v in EXPECTED.items() if v == n)}): {WHY[n]}"
              for n in notes]
    return "\n".join(lines)


def run_all() -> dict[tuple[str, str], str]:
    """Run every cell; ``ok`` or ``error: <first words of the message>``. Prints each cell's time."""
    import tempfile

    outcomes = {}
    with tempfile.TemporaryDirectory() as tmp:
        made: list[Path] = []

        def synth() -> Path:
            if not made:
                from convscope.data import generate

                made.append(generate(Path(tmp) / "broden", n=8, size=SIZE, seed=7, progress=False))
            return made[0]

        for a in ARCHS:
            model = build(a.name)
            for m in METHODS:
                t0 = time.perf_counter()
                try:
                    cell(m, a, model, Path(tmp), synth)
                    outcomes[(a.name, m)] = "ok"
                except cs.ConvscopeError as exc:
                    outcomes[(a.name, m)] = f"error: {exc}"
                except Exception as exc:  # a failed check or an undocumented error: reported, never written
                    outcomes[(a.name, m)] = f"FAILED {type(exc).__name__}: {exc}"
                print(f"{a.name:20s} {m:16s} {time.perf_counter() - t0:6.2f} s  {outcomes[(a.name, m)]}",
                      file=sys.stderr)
            del model
    return outcomes


def write_doc(outcomes: dict[tuple[str, str], str]) -> None:
    text = DOC.read_text() if DOC.exists() else f"{START}\n{END}\n"
    head, rest = text.split(START)
    _, tail = rest.split(END)
    DOC.write_text(f"{head}{START}\n{table(outcomes)}\n{END}{tail}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    found = run_all()
    expected = outcomes_expected()
    differ = {k: (v, expected[k]) for k, v in found.items() if not v.startswith(expected[k])}
    if differ:
        print(f"cells differ from EXPECTED (found, expected): {differ}", file=sys.stderr)
        sys.exit(1)
    write_doc(expected)
    print(f"wrote the matrix into {DOC}")


# --------------------------------------------------------------------------- done-when: Grad-CAM on ResNet-50 by hand


def bilinear(maps: np.ndarray, size: int) -> np.ndarray:
    """``... x h x w`` -> ``... x size x size``, bilinear with half-pixel centres (``align_corners=False``)."""
    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    (y0, y1, wy), (x0, x1, wx) = axis(maps.shape[-2]), axis(maps.shape[-1])
    rows = maps[..., y0, :] * (1 - wy)[:, None] + maps[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


@pytest.fixture(scope="module")
def resnet50_64():
    """ResNet-50 in float64 with random batch-norm statistics, 10 classes, and one 64 px image (layer4: 2 x 2)."""
    from convscope.models.resnet import resnet50

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = resnet50(10).double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.1)
    return net, torch.randn(1, 3, 64, 64, generator=g, dtype=torch.float64)


def test_gradcam_resnet50_equals_float64_hand_computation(resnet50_64):
    """Grad-CAM (Selvaraju et al. 2017, Eq. 1-2) on ``layer4``, its last block's ReLU calls 2 (the block output) and
    1 (inside the block), against numpy: y_c = W_c . mean_ij(A) + b_c, so dy_c/dA_kij = W_ck / (h w) at the stage
    output; inside the block the gradient goes back by hand through the residual ReLU, bn3 and the 1x1 conv3."""
    net, x = resnet50_64
    blk = net.layer4[2]
    with torch.no_grad():  # the block's input and its inner activation, by running the modules one by one
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        h = net.layer4[1](net.layer4[0](net.layer3(net.layer2(net.layer1(h)))))
        a1 = blk.relu(blk.bn2(blk.conv2(blk.relu(blk.bn1(blk.conv1(h))))))
    h, a1 = h[0].numpy(), a1[0].numpy()
    w3 = blk.conv3.weight.detach().numpy()[:, :, 0, 0]  # 2048 x 512
    bn = blk.bn3
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    shift = bn.bias.detach().numpy() - bn.running_mean.detach().numpy() * scale
    pre = np.einsum("oc,chw->ohw", w3, a1) * scale[:, None, None] + shift[:, None, None] + h
    out = np.maximum(pre, 0.0)  # layer4 output = layer4.2.relu call 2
    fc = net.fc.weight.detach().numpy()
    hw = out.shape[1] * out.shape[2]

    def cam(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:  # grads: K x C x h x w
        alpha = grads.mean(axis=(2, 3))
        return bilinear(np.maximum(np.einsum("kc,chw->khw", alpha, acts), 0.0), 64)[None]

    g_out = np.stack([np.broadcast_to(fc[c][:, None, None] / hw, out.shape) for c in range(10)])  # every class
    g_a1 = np.einsum("oc,kohw->kchw", w3, g_out * (pre > 0) * scale[None, :, None, None])
    ref_out, ref_a1 = cam(out, g_out), cam(a1, g_a1)
    # explain two classes whose maps are not all zero at both layers (random weights: some are negative everywhere)
    classes = [c for c in range(10) if ref_out[0, c].max() > 0 and ref_a1[0, c].max() > 0][:2]
    assert len(classes) == 2
    ref_out, ref_a1 = ref_out[:, classes], ref_a1[:, classes]
    target = torch.tensor([classes])
    for layer, ref in (("layer4", ref_out), ("layer4.2.relu:2", ref_out), ("layer4.2.relu:1", ref_a1)):
        got = cs.gradcam(net, x, target=target, layer=layer).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max(), err_msg=layer)
    with pytest.raises(cs.ConvscopeError, match="layer4.2.relu:0 or layer4.2.relu:1"):
        cs.gradcam(net, x, target=target, layer="layer4.2.relu")
