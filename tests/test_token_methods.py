"""Token and channels-last layers as maps in the probe (layout=), and every map method on a tiny ViT and Swin.

Independent references: the probe with ``layout=None`` (raw tokens / channels-last tensors, rearranged by explicit
indexing in the test), Swin's own ``permute`` layer (a plain N x C x H x W map), and hand formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convscope as cs
from convscope.core.probe import probe
from convscope.core.targets import batched_grad, target_scores
from convscope.data import generate
from convscope.errors import ConvscopeError
from convscope.methods.cam import cam, gradcam, gradcam_pp, layercam, resolve_cam_layer, scorecam
from convscope.methods.dissect import DissectConfig, dissect
from convscope.models.swin import swin_t
from convscope.models.vit import vit_b_16

from .helpers import assert_untouched, snapshot

BLOCK0, BLOCK1 = "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"
LN1 = f"{BLOCK1}.ln_1"
GH = GW = 4  # 32 px / 8 px patches


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    model = vit_b_16(num_classes=4, image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=12, mlp_dim=24)
    with torch.no_grad():  # torchvision zero-initializes the head and class token: give them values
        for p in (model.heads.head.weight, model.heads.head.bias, model.class_token):
            p.normal_()
    return model.eval()


def tiny_swin(embed_dim: int = 12) -> nn.Module:
    torch.manual_seed(0)
    return swin_t(num_classes=3, embed_dim=embed_dim, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4]).eval()


def grid(tokens: torch.Tensor) -> torch.Tensor:
    """N x (1 + 16) x D tokens -> N x D x 4 x 4 by explicit indexing (class token dropped, row-major patches)."""
    n, _, d = tokens.shape
    out = torch.empty(n, d, GH, GW, dtype=tokens.dtype)
    for y in range(GH):
        for x in range(GW):
            out[:, :, y, x] = tokens[:, 1 + y * GW + x]
    return out


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


# --------------------------------------------------------------------------- the probe's layout=


def test_probe_records_token_and_channels_last_layers_as_maps(x):
    vit, swin = tiny_vit(), tiny_swin()
    before = snapshot(vit)
    with torch.no_grad(), probe(vit, [BLOCK0, "conv_proj", "heads.head"]) as p:
        vit(x)
        maps, info = p.activations, p.token_info
    with torch.no_grad(), probe(vit, [BLOCK0, "conv_proj"], layout=None) as raw:
        vit(x)
    assert_untouched(vit, before)
    tokens = raw.activations[BLOCK0]
    assert tokens.shape == (2, 17, 12) and maps[BLOCK0].shape == (2, 12, 4, 4)
    assert torch.equal(maps[BLOCK0], grid(tokens))
    assert (info[BLOCK0].layout, info[BLOCK0].extra_tokens, info[BLOCK0].grid) == ("tokens", 1, (4, 4))
    assert torch.equal(info[BLOCK0].extra, tokens[:, :1])  # the dropped class token is reported
    assert torch.equal(maps["conv_proj"], raw.activations["conv_proj"]) and info["conv_proj"].layout == "nchw"
    assert maps["heads.head"].shape == (2, 4)  # N x C outputs untouched
    with torch.no_grad(), probe(swin, ["features.1", "features.3", "permute"]) as p:
        swin(x)
    with torch.no_grad(), probe(swin, ["features.1", "norm"], layout=None) as raw:
        swin(x)
    assert torch.equal(p.activations["features.1"], raw.activations["features.1"].permute(0, 3, 1, 2))
    assert p.token_info["features.3"].layout == "nhwc" and p.activations["features.3"].shape == (2, 24, 4, 4)
    assert raw.activations["norm"].shape == (2, 4, 4, 24)  # layout=None: as the layer returns it


def test_edits_work_in_map_space_and_gradients_flow_through_the_map(x):
    vit = tiny_vit()
    seen: list[torch.Tensor] = []
    handle = vit.encoder.layers[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad(), probe(vit, BLOCK0, layout=None) as raw:
            vit(x)
        with torch.no_grad(), probe(vit, BLOCK0, edit={BLOCK0: lambda m: m * 0}) as p:
            vit(x)
    finally:
        handle.remove()
    tokens = raw.activations[BLOCK0]
    assert torch.equal(seen[1][:, 0], tokens[:, 0]) and not seen[1][:, 1:].any()  # class token put back as it was
    assert not p.activations[BLOCK0].any()  # recorded after the edit
    # d score / d map equals d score / d tokens rearranged (class token's own gradient dropped)
    xx = x.clone().requires_grad_(True)
    with probe(vit, BLOCK0) as p:
        score = vit(xx)[:, 2].sum()
        g_map, gx = torch.autograd.grad(score, [p.activations[BLOCK0], xx])
    with probe(vit, BLOCK0, layout=None) as raw:
        score_raw = vit(xx)[:, 2].sum()
        g_tok, gx_raw = torch.autograd.grad(score_raw, [raw.activations[BLOCK0], xx])
    assert g_map.shape == (2, 12, 4, 4) and g_map.abs().sum() > 0
    torch.testing.assert_close(g_map, grid(g_tok))
    torch.testing.assert_close(gx, gx_raw)


def test_cnns_are_untouched_and_bad_layouts_are_one_line_errors(x):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 2))
    with torch.no_grad(), probe(net, ["0", "1", "4"]) as p:
        net(x)
    assert p.activations["0"].shape == (2, 8, 32, 32) and not p.layout_errors
    swin = tiny_swin(embed_dim=8)  # features.1 is N x 8 x 8 x 8: "auto" cannot tell the layouts apart
    with torch.no_grad(), probe(swin, "features.1") as p:
        swin(x)
    assert p.activations["features.1"].shape == (2, 8, 8, 8) and "layout=" in p.layout_errors["features.1"]
    with torch.no_grad(), probe(swin, "features.1", layout={"features.1": "nhwc"}) as p:
        swin(x)
    assert p.token_info["features.1"].layout == "nhwc"
    for kwargs, message in [({"layout": "token"}, "is not one of"), ({"layout": {"nope": "nhwc"}}, "not probed"),
                            ({"layout": "tokens:1"}, "needs N x tokens x D")]:
        with pytest.raises(ConvscopeError, match=message) as err, torch.no_grad(), \
                probe(swin, "features.1", **kwargs):
            swin(x)
        assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- CAMs and layer="auto"


def test_auto_cam_layer_is_the_last_block_ln_1_on_a_vit_and_the_final_map_on_swin(x):
    vit, swin = tiny_vit(), tiny_swin()
    assert resolve_cam_layer(vit) == resolve_cam_layer(vit, "") == LN1
    assert resolve_cam_layer(swin) == "permute"
    assert resolve_cam_layer(vit, f"{BLOCK0}") == BLOCK0
    # why: after the last attention only the class token reaches the head; the patch tokens' gradients are zero
    with probe(vit, [BLOCK1, LN1, "encoder.ln"]) as p:
        score = vit(x)[:, 1].sum()
        grads = torch.autograd.grad(score, [p.activations[n] for n in (BLOCK1, LN1, "encoder.ln")])
    assert not grads[0].any() and not grads[2].any() and grads[1].abs().sum() > 0
    assert not gradcam(vit, x, layer=BLOCK1).any()  # the last block's output gives an empty map


def test_gradcam_on_vit_and_swin_equals_independent_computations(x):
    vit = tiny_vit()
    got = gradcam(vit, x, target=[[0, 3], [1, 2]], upsample=False)  # layer="auto": the last ln_1
    with torch.enable_grad(), probe(vit, LN1, layout=None) as raw:
        scores, _ = target_scores(vit(x), [[0, 3], [1, 2]])
        tokens = raw.activations[LN1]
        (g,) = batched_grad(scores, [tokens])  # K N T D
    a = grid(tokens.detach())
    expect = torch.stack([F.relu((grid(g[k]).mean((2, 3))[:, :, None, None] * a).sum(1)) for k in range(2)], 1)
    assert got.shape == (2, 2, 4, 4) and got.abs().sum() > 0
    torch.testing.assert_close(got, expect)
    swin = tiny_swin()
    for f in (gradcam, gradcam_pp, layercam):  # Swin's channels-last norm output vs its own N x C x H x W permute
        torch.testing.assert_close(f(swin, x, layer="norm"), f(swin, x, layer="permute"))
    torch.testing.assert_close(scorecam(swin, x[:1], layer="norm"), scorecam(swin, x[:1], layer="permute"))


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin], ids=["vit", "swin"])
def test_every_cam_runs_on_transformers_and_leaves_them_untouched(make, x):
    model = make()
    before = snapshot(model)
    for f in (gradcam, gradcam_pp, layercam, scorecam):
        maps = f(model, x, target=cs.top_k(2))
        assert maps.shape == (2, 2, 32, 32) and torch.isfinite(maps).all() and maps.abs().sum() > 0, f.__name__
    assert_untouched(model, before)


def test_cam_checks_its_premise_on_tokens(x):
    vit, swin = tiny_vit(), tiny_swin()
    with pytest.raises(ConvscopeError, match="reads its 1 extra") as err:
        cam(vit, x, layer=BLOCK1)
    assert "\n" not in str(err.value)
    got = cam(swin, x, target=[1, 2], upsample=False)  # Swin: norm -> avgpool -> head, CAM's architecture
    with torch.no_grad(), probe(swin, "norm", layout=None) as raw:
        swin(x)
    a = raw.activations["norm"]  # N H W C
    expect = torch.stack([torch.einsum("c,hwc->hw", swin.head.weight[k], a[i]) for i, k in enumerate([1, 2])])
    torch.testing.assert_close(got[:, 0], expect)


# --------------------------------------------------------------------------- other map methods


@pytest.mark.parametrize("make, layer", [(tiny_vit, BLOCK0), (tiny_swin, "features.1")], ids=["vit", "swin"])
def test_top_k_maximization_inversion_on_transformers(make, layer, x):
    model = make()
    before = snapshot(model)
    imgs = torch.randn(5, 3, 32, 32)
    top = cs.top_k_activations(model, imgs, layer, k=2)[layer]
    with torch.no_grad(), probe(model, layer, layout=None) as raw:
        model(imgs)
    t = raw.activations[layer]
    per_image = (grid(t) if t.dim() == 3 else t.permute(0, 3, 1, 2)).amax((2, 3))  # N x D: spatial max per unit
    assert top.values.shape == (t.shape[-1], 2)
    torch.testing.assert_close(top.values, per_image.T.topk(2, dim=1).values)
    am = cs.activation_maximization(model, layer, [0, 3], steps=3, size=32, regularize="none")
    with torch.no_grad(), probe(model, layer, layout=None) as raw:
        model(am.x)
    t = raw.activations[layer]
    means = (grid(t) if t.dim() == 3 else t.permute(0, 3, 1, 2)).mean((2, 3))  # channel objective on the map
    assert am.images.shape[0] == 2
    torch.testing.assert_close(am.activations, torch.stack([means[0, 0], means[1, 3]]), rtol=1e-4, atol=1e-5)
    # priors, jitter, lr and lr_decay all given: invert's layer_depths (every leaf module once, for the per-depth
    # defaults) does not run, as Swin shares modules
    inv = cs.invert(model, x[:1], layer, steps=2, lambda_alpha=1e-5, lambda_tv=1e-5, jitter=0, lr=0.05, lr_decay=0.0)
    assert inv.images.shape == (1, 3, 32, 32) and torch.isfinite(inv.images).all()
    assert_untouched(model, before)


def test_dissect_a_transformer_layer(tmp_path):
    ds = generate(tmp_path / "broden", n=8, size=32, seed=7, progress=False)
    for model, layer, units in [(tiny_vit(), BLOCK0, 12), (tiny_swin(), "features.1", 12)]:
        before = snapshot(model)
        res = dissect(model, ds, layer, DissectConfig(quantile=0.05, workers=0, batch_size=8), progress=False)[layer]
        assert len(res.rows) == units and torch.isfinite(res.iou).all() and res.iou.max() > 0
        assert_untouched(model, before)


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin], ids=["vit", "swin"])
def test_guided_backprop_refuses_models_without_relu(make, x):
    model = make()
    before = snapshot(model)
    for f in (cs.guided_backprop, cs.deconvnet_rule):
        with pytest.raises(ConvscopeError, match="ran no ReLU") as err:
            f(model, x)
        assert "\n" not in str(err.value)
    assert_untouched(model, before)
