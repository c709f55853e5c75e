"""Every public method leaves the model exactly as it came, on success and when it raises (cf. Captum's
generated hook-removal tests). New methods add one line to CASES."""

from __future__ import annotations

import pytest
import torch

import convscope as cs

from .helpers import assert_untouched, snapshot


def _boom(output: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("target failed")


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
}


def _probe_rule(m, x, layer):
    x = x.clone().requires_grad_(True)
    with cs.probe(m, layer, relu_rule="guided") as p:
        out = m(x)
        p.gradients(out[:, 0].sum(), [layer])


MODELS = {"demo_net": ("features.relu5", 112), "efficientnet_lite0": ("head.act", 224)}


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method", list(CASES))
def test_model_untouched(method, model_name, request):
    if method == "cam" and model_name == "demo_net":
        pytest.skip("CAM needs a global-average-pooling net; demo_net has fully connected layers")
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
