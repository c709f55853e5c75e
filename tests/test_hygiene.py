"""Every public method leaves the model exactly as it came, on success and when it raises (cf. Captum's
generated hook-removal tests). New methods add one line to CASES."""

from __future__ import annotations

import pytest
import torch

import convscope as cs

from .helpers import assert_untouched, snapshot


def _boom(output: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("target failed")


def _varied(x: torch.Tensor) -> torch.Tensor:
    """Four different images (CKA needs features that vary over the examples)."""
    return x + 0.5 * torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(0))


def _boom2(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("loss failed")


# name -> (call on success, call that raises inside the method)
CASES = {
    "gradcam": (lambda m, x, L: cs.gradcam(m, x, target=cs.top_k(2), layer=L),
                lambda m, x, L: cs.gradcam(m, x, target=_boom, layer=L)),
    "gradcam_pp": (lambda m, x, L: cs.gradcam_pp(m, x, target=0, layer=L),
                   lambda m, x, L: cs.gradcam_pp(m, x, target=10**6, layer=L)),
    "cam": (lambda m, x, L: cs.cam(m, x, target=1),
            lambda m, x, L: cs.cam(m, x, target=_boom)),
    "predict": (lambda m, x, L: cs.predict(m, x),
                lambda m, x, L: cs.predict(m, x[:, :2])),
    "list_layers": (lambda m, x, L: cs.list_layers(m),
                    lambda m, x, L: cs.list_layers(m, sample=x[:, :1])),
    "probe_rules": (lambda m, x, L: _probe_rule(m, x, L),
                    lambda m, x, L: _probe_rule(m, x[:, :2], L)),
    "saliency": (lambda m, x, L: cs.saliency(m, x, target=cs.top_k(2)),
                 lambda m, x, L: cs.saliency(m, x, target=_boom)),
    "gradient": (lambda m, x, L: cs.gradient(m, x, target=[[0, 1]]),
                 lambda m, x, L: cs.gradient(m, x, target=10**6)),
    "input_x_gradient": (lambda m, x, L: cs.input_x_gradient(m, x, target=0),
                         lambda m, x, L: cs.input_x_gradient(m, x[:, :2], target=0)),
    "smoothgrad": (lambda m, x, L: cs.smoothgrad(m, x, target=0, n=2, batch_size=1),
                   lambda m, x, L: cs.smoothgrad(m, x, target=_fails_after(1), n=2)),
    "guided_backprop": (lambda m, x, L: cs.guided_backprop(m, x, target=cs.top_k(2)),
                        lambda m, x, L: cs.guided_backprop(m, x, target=_boom)),
    "deconvnet_rule": (lambda m, x, L: cs.deconvnet_rule(m, x, target=1),
                       lambda m, x, L: cs.deconvnet_rule(m, x, target=10**6)),
    "guided_gradcam": (lambda m, x, L: cs.guided_gradcam(m, x, target=0, layer=L),
                       lambda m, x, L: cs.guided_gradcam(m, x, target=0, layer=L + "x")),
    "occlusion": (lambda m, x, L: cs.occlusion(m, x, target=0, window=x.shape[-1] // 2,
                                               stride=x.shape[-1] // 2, layer=L),
                  lambda m, x, L: cs.occlusion(m, x, target=_fails_after(1), window=x.shape[-1] // 2,
                                               stride=x.shape[-1] // 2, batch_size=2, layer=L)),
    "pgd": (lambda m, x, L: cs.pgd(m, x, eps=1 / 255, steps=2),
            lambda m, x, L: cs.pgd(m, x, target=_fails_after(1), steps=2)),
    "feature_change": (lambda m, x, L: cs.feature_change(m, x, x.flip(-1), L),
                       lambda m, x, L: cs.feature_change(m, x, x[:, :2], L)),
    "deconvnet": (lambda m, x, L: cs.deconvnet(m, x, L, units=[0, 1]),
                  lambda m, x, L: cs.deconvnet(m, x, L, units=[10**6])),
    "top_k_activations": (lambda m, x, L: cs.top_k_activations(m, x.repeat(3, 1, 1, 1), L, k=2, batch_size=2),
                          lambda m, x, L: cs.top_k_activations(m, _failing_stream(x), L)),
    "receptive_field": (lambda m, x, L: cs.receptive_field(m, L, (0, 0), tuple(x.shape[-2:])),
                        lambda m, x, L: cs.receptive_field(m, L, (10**6, 0), tuple(x.shape[-2:]))),
    "activation_maximization": (
        lambda m, x, L: cs.activation_maximization(m, L, [0, 1], steps=2, size=32, progress=False),
        lambda m, x, L: cs.activation_maximization(m, L, [0, 10**6], steps=2, size=32, progress=False)),
    "fooling_image": (lambda m, x, L: cs.fooling_image(m, [0, 1], max_steps=2, size=32, progress=False),
                      lambda m, x, L: cs.fooling_image(m, [10**6], max_steps=2, size=32, progress=False)),
    "multifaceted": (lambda m, x, L: cs.multifaceted(m, L, [0, 1], _three(x), facets=2, top=3, steps=1,
                                                     progress=False),
                     lambda m, x, L: cs.multifaceted(m, L, [0, 10**6], _three(x), facets=2, top=3, steps=1,
                                                     progress=False)),
    "invert": (lambda m, x, L: cs.invert(m, x[..., :64, :64], [_first_relu(m), L], steps=2, progress=False),
               lambda m, x, L: cs.invert(m, x[..., :64, :64], L, steps=2, target_features={L: torch.zeros(1, 5)},
                                         progress=False)),
    "style_transfer": (lambda m, x, L: cs.style_transfer(m, x[..., :64, :64], x[..., :48, :48], L, [L], steps=2,
                                                         progress=False),
                       lambda m, x, L: cs.style_transfer(m, x[..., :64, :64], x, L, [L], steps=2,
                                                         init=x[..., :32, :32], progress=False)),
    "dgn_am": (lambda m, x, L: cs.dgn_am(m, _tiny_generator(), L, [0, 1], code_shape=(4,), steps=2, progress=False),
               lambda m, x, L: cs.dgn_am(m, _tiny_generator(), L, [0, 10**6], code_shape=(4,), steps=2,
                                         progress=False)),
    "integrated_gradients": (
        lambda m, x, L: cs.integrated_gradients(m, x, target=cs.top_k(2), steps=2, batch_size=1),
        lambda m, x, L: cs.integrated_gradients(m, x, target=_fails_after(1), steps=2)),
    "layercam": (lambda m, x, L: cs.layercam(m, x, target=cs.top_k(2), layer=L),
                 lambda m, x, L: cs.layercam(m, x, target=_boom, layer=L)),
    "scorecam": (lambda m, x, L: cs.scorecam(m, x, target=cs.top_k(2), layer=L, batch_size=128),
                 lambda m, x, L: cs.scorecam(m, x, target=_fails_after(1), layer=L)),
    "lrp": (lambda m, x, L: cs.lrp(m, x, target=cs.top_k(2), composite="epsilon_gamma_box"),
            lambda m, x, L: cs.lrp(m, x, target=_boom)),
    "visual_backprop": (lambda m, x, L: cs.visual_backprop(m, x),
                        lambda m, x, L: cs.visual_backprop(m, x[:, :2])),
    "cnn_fixations": (lambda m, x, L: cs.cnn_fixations(m, x, target=cs.top_k(2)),
                      lambda m, x, L: cs.cnn_fixations(m, x, target=10**6)),
    "prediction_difference": (
        lambda m, x, L: cs.prediction_difference(m, x, target=0, window=4, stride=x.shape[-1] // 2,
                                                 samples=2),  # a small window: its conditional Gaussian is cheap
        lambda m, x, L: cs.prediction_difference(m, x, target=10**6, window=4)),
    "model_graph": (lambda m, x, L: cs.model_graph(m, input_size=tuple(x.shape[-2:])),
                    lambda m, x, L: cs.model_graph(m, sample=x[:, :2])),
    "embed": (lambda m, x, L: cs.embed(m, L, x.repeat(4, 1, 1, 1), method="pca"),
              lambda m, x, L: cs.embed(m, L, _failing_stream(x), method="pca")),
    "deep_dream": (lambda m, x, L: cs.deep_dream(m, x, L, steps=1, octaves=1),
                   lambda m, x, L: cs.deep_dream(m, x[:, :2], L, steps=1, octaves=1)),
    "layer_similarity": (
        lambda m, x, L: cs.layer_similarity(m, m, _varied(x), [L], [L], batch_size=4),
        lambda m, x, L: cs.layer_similarity(m, m, _failing_stream(x.repeat(4, 1, 1, 1)), [L], [L])),
    "match_units": (lambda m, x, L: cs.match_units(m, m, x, L, L),
                    lambda m, x, L: cs.match_units(m, m, _failing_stream(x), L, L)),
    "loss_landscape": (lambda m, x, L: cs.loss_landscape(m, x, torch.zeros(len(x), dtype=torch.long), steps=3),
                       lambda m, x, L: cs.loss_landscape(m, x, torch.zeros(len(x), dtype=torch.long), steps=3,
                                                         loss=_boom2)),
}
SKIP = {("cam", "demo_net"): "CAM needs a global-average-pooling net; demo_net has fully connected layers",
        ("scorecam", "efficientnet_lite0"): "1280 masked forward passes at 224 px: tests/test_cam_more.py covers it"}


def _first_relu(m: torch.nn.Module) -> str:
    return "features.relu1" if "features.relu1" in dict(m.named_modules()) else "stem.act"


def _three(x: torch.Tensor) -> torch.Tensor:
    """Three distinct 64 x 64 images from one (for clustering; small, so the test stays fast)."""
    x = x[..., :64, :64]
    return torch.cat([x, x.flip(-1), x.flip(-2)])


def _tiny_generator() -> torch.nn.Module:
    """Codes of 4 numbers -> 3 x 32 x 32 images in (0, 1)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3 * 32 * 32), torch.nn.Sigmoid(), torch.nn.Unflatten(1, (3, 32, 32)))


def _fails_after(calls: int):
    """A score target that works ``calls`` times, then raises (an error in the middle of a method's loop)."""
    seen = []

    def target(output: torch.Tensor) -> torch.Tensor:
        seen.append(1)
        if len(seen) > calls:
            raise RuntimeError("target failed later")
        return output[:, 0]
    return target


def _failing_stream(x: torch.Tensor):
    """A stream of image batches that breaks after the first (an error in the middle of a streaming loop)."""
    yield x
    raise RuntimeError("stream failed")


def _probe_rule(m, x, layer):
    x = x.clone().requires_grad_(True)
    with cs.probe(m, layer, relu_rule="guided") as p:
        out = m(x)
        p.gradients(out[:, 0].sum(), [layer])


MODELS = {"demo_net": ("features.relu5", 112), "efficientnet_lite0": ("head.act", 224)}


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method", list(CASES))
def test_model_untouched(method, model_name, request):
    if (method, model_name) in SKIP:
        pytest.skip(SKIP[method, model_name])
    model = request.getfixturevalue({"demo_net": "demo", "efficientnet_lite0": "lite0"}[model_name])
    layer, size = MODELS[model_name]
    model.train()  # a non-default state must come back too
    model.classifier.requires_grad_(False) if hasattr(model, "classifier") else None
    try:
        before = snapshot(model)
        x = torch.randn(1, 3, size, size)
        ok, bad = CASES[method]
        ok(model, x, layer)
        assert_untouched(model, before)
        with pytest.raises(Exception):  # noqa: B017 - any error; what matters is the state afterwards
            bad(model, x, layer)
        assert_untouched(model, before)
    finally:
        model.eval()
        model.requires_grad_(True)


def test_no_module_imports_a_private_name_from_another():
    """Shared pieces are public (core.model, topk.RunningTopK, ...): no ``from x import _name`` across modules."""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "convscope"
    bad = []
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                bad += [f"{path.relative_to(src)}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad
