"""core.tokens: layer outputs as N x C x H x W maps (conv maps, channels-last maps, ViT tokens) and back."""

from __future__ import annotations

import pytest
import torch

from convscope.core.probe import probe
from convscope.core.targets import batched_grad, target_scores
from convscope.core.tokens import TokenInfo, as_feature_map, from_feature_map
from convscope.errors import ConvscopeError
from convscope.methods.cam import gradcam_weights
from convscope.models.swin import swin_t
from convscope.models.vit import vit_b_16

BLOCK = "encoder.layers.encoder_layer_0"


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = vit_b_16(num_classes=4, image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=6, mlp_dim=12)
    with torch.no_grad():
        for p in (model.heads.head.weight, model.heads.head.bias, model.class_token):
            p.normal_()
    return model.double().eval()


def test_nchw_is_returned_unchanged():
    t = torch.randn(2, 16, 7, 9)
    m, info = as_feature_map(t, input_size=(28, 36))
    assert m is t and info == TokenInfo("nchw", (2, 16, 7, 9), (7, 9)) and info.spec == "nchw"
    assert from_feature_map(m, info) is t


def test_nhwc_permutes_and_round_trips():
    t = torch.randn(2, 7, 9, 16)  # Swin / ConvNeXt channels-last, recognized by the input's aspect
    m, info = as_feature_map(t, input_size=(224, 288))
    assert info.layout == "nhwc" and info.grid == (7, 9) and m.shape == (2, 16, 7, 9)
    assert torch.equal(m[1, 5, 3, 4], t[1, 3, 4, 5])
    assert m.data_ptr() == t.data_ptr()  # a view, no copy
    assert torch.equal(from_feature_map(m, info), t)
    assert as_feature_map(torch.randn(1, 7, 7, 768))[1].layout == "nhwc"  # no input size: the square grid decides


@pytest.mark.parametrize("extra, size, patch", [(1, (32, 48), 8), (5, (32, 48), 8), (0, (64, 64), 16),
                                                (2, (28, 28), 7)])
def test_tokens_drop_leading_extras_and_round_trip(extra, size, patch):
    gh, gw = size[0] // patch, size[1] // patch
    t = torch.randn(3, extra + gh * gw, 10)
    m, info = as_feature_map(t, input_size=size, patch_size=patch)
    assert (info.layout, info.extra_tokens, info.grid, info.spec) == ("tokens", extra, (gh, gw), f"tokens:{extra}")
    assert m.shape == (3, 10, gh, gw)
    for y, x in [(0, 0), (gh - 1, 0), (0, gw - 1), (gh - 1, gw - 1), (1, 2)]:
        assert torch.equal(m[:, :, y, x], t[:, extra + y * gw + x])  # row-major patch order
    back = from_feature_map(m, info)
    assert torch.equal(back, t)
    assert as_feature_map(t, layout=f"tokens:{extra}", input_size=size)[1] == info
    g = torch.randn_like(t)
    gm, ginfo = as_feature_map(g, layout=info)  # a gradient of the same layer, read the same way
    assert ginfo == info and torch.equal(gm[:, :, 1, 1], g[:, extra + gw + 1])


def test_token_grid_from_the_input_size_alone():
    t = torch.randn(1, 25, 6)  # 32 x 48 input: class token + 4 x 6 grid (a patch of 8 tiles it exactly)
    assert as_feature_map(t, input_size=(32, 48))[1].grid == (4, 6)
    assert as_feature_map(torch.randn(1, 29, 6), input_size=(32, 48))[1].extra_tokens == 5
    m, info = as_feature_map(torch.randn(1, 197, 8), input_size=(230, 230))  # 16 px patches, 6 px cut off
    assert (info.extra_tokens, info.grid) == (1, (14, 14))


def test_vit_tokens_without_input_size_need_a_square_grid():
    m, info = as_feature_map(torch.randn(1, 197, 768))  # ViT-B/16 at 224: class token + 14 x 14
    assert (info.extra_tokens, info.grid, m.shape) == (1, (14, 14), (1, 768, 14, 14))
    assert as_feature_map(torch.randn(1, 201, 768))[1].extra_tokens == 5  # class + 4 registers


def test_from_feature_map_reinserts_the_original_extra_tokens_and_takes_edits():
    t = torch.randn(2, 17, 4)
    m, info = as_feature_map(t, input_size=32, patch_size=8)
    edited = from_feature_map(m * 0, info)
    assert torch.equal(edited[:, 0], t[:, 0]) and not edited[:, 1:].any()
    cls = torch.ones(2, 1, 4)
    assert torch.equal(from_feature_map(m, info, extra=cls)[:, :1], cls)
    with pytest.raises(ConvscopeError, match="does not fit the layer"):
        from_feature_map(m[:, :, :2], info)
    with pytest.raises(ConvscopeError, match="needs an N x C x H x W map"):
        from_feature_map(t, info)


@pytest.mark.parametrize("shape, kwargs, message", [
    ((1, 8, 8, 8), {}, "alike; pass layout='nchw' or layout='nhwc'"),
    ((1, 9, 9, 8), {"input_size": (32, 32)}, "fits both"),
    ((1, 9, 50, 3), {"input_size": (32, 32)}, "fits neither"),
    ((1, 17, 6), {}, "ambiguous as tokens"),
    ((1, 10, 6), {"input_size": (32, 32), "patch_size": 8}, "does not hold a 4x4 patch grid"),
    ((1, 18, 6), {"input_size": (28, 28)}, "ambiguous as tokens"),
    ((1, 3, 6), {"layout": "tokens:0"}, "holds no patch grid"),
    ((4, 10), {}, "not a spatial map"),
    ((1, 17, 6), {"layout": "nhwc"}, "needs a 4-D tensor"),
    ((1, 4, 4, 4), {"layout": "tokens"}, "needs N x tokens x D"),
    ((1, 17, 6), {"layout": "token"}, "is not one of auto, nchw, nhwc, tokens, tokens:E"),
    ((1, 17, 6), {"input_size": (0, 4)}, "input_size"),
])
def test_ambiguous_or_impossible_shapes_are_one_line_errors(shape, kwargs, message):
    with pytest.raises(ConvscopeError, match=message) as err:
        as_feature_map(torch.zeros(shape), **kwargs)
    assert "\n" not in str(err.value)
    assert "layout=" in str(err.value) or message in ("input_size", "not a spatial map")


def test_explicit_layout_resolves_the_ambiguity():
    t = torch.randn(1, 8, 8, 8)
    assert torch.equal(as_feature_map(t, layout="nhwc")[0], t.permute(0, 3, 1, 2))
    assert as_feature_map(t, layout="nchw")[0] is t
    m, info = as_feature_map(torch.randn(1, 17, 6), layout="tokens:1")
    assert info.grid == (4, 4) and m.shape == (1, 6, 4, 4)


def test_vit_and_swin_layer_outputs_read_as_maps():
    vit = tiny_vit()
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    with torch.no_grad(), probe(vit, [BLOCK, "conv_proj"], layout=None) as p:
        vit(x)
    m, info = as_feature_map(p.activations[BLOCK], input_size=x.shape[-2:], patch_size=vit.patch_size)
    assert m.shape == (2, 6, 4, 6) and info.extra_tokens == 1
    assert as_feature_map(p.activations["conv_proj"], input_size=x.shape[-2:])[1].layout == "nchw"
    torch.manual_seed(0)
    swin = swin_t(num_classes=3, embed_dim=12, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4]).eval()
    x = torch.randn(1, 3, 32, 64)
    layers = ["features.0.0", "features.1.1", "features.3", "norm", "permute"]
    with torch.no_grad(), probe(swin, layers, layout=None) as p:
        swin(x)
    got = {n: as_feature_map(p.activations[n], input_size=(32, 64)) for n in layers}
    assert {n: (i.layout, tuple(m.shape)) for n, (m, i) in got.items()} == {
        "features.0.0": ("nchw", (1, 12, 8, 16)), "features.1.1": ("nhwc", (1, 12, 8, 16)),
        "features.3": ("nhwc", (1, 24, 4, 8)), "norm": ("nhwc", (1, 24, 4, 8)), "permute": ("nchw", (1, 24, 4, 8))}
    assert torch.equal(got["norm"][0], got["permute"][0])  # Swin's own permute gives the same map


def test_gradients_flow_through_the_map_into_the_tokens():
    vit = tiny_vit()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)  # the graph starts at the input
    maps: list[torch.Tensor] = []

    def through_map(t: torch.Tensor) -> torch.Tensor:
        m, info = as_feature_map(t, input_size=(32, 32), patch_size=8)
        maps.append(m)
        return from_feature_map(m, info)

    with probe(vit, BLOCK, layout=None) as p:
        plain = vit(x)[0, 2]
        g_plain, gx_plain = torch.autograd.grad(plain, [p.activations[BLOCK], x])
    with probe(vit, BLOCK, edit={BLOCK: through_map}, layout=None) as p:
        score = vit(x)[0, 2]
        g_map, g_tokens, gx = torch.autograd.grad(score, [maps[0], p.activations[BLOCK], x])
    torch.testing.assert_close(score, plain, rtol=0, atol=0)
    torch.testing.assert_close(g_tokens, g_plain, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_plain, rtol=0, atol=0)  # the map passes gradients on to the input
    assert g_map.shape == (1, 6, 4, 4) and g_map.abs().sum() > 0
    torch.testing.assert_close(g_map, as_feature_map(g_plain, layout="tokens:1")[0])  # d score / d map
    # an edit of the map reaches the output
    with probe(vit, BLOCK, layout=None,
               edit={BLOCK: lambda t: from_feature_map(as_feature_map(t, layout="tokens:1")[0] * 0,
                                                       as_feature_map(t, layout="tokens:1")[1])}):
        assert not torch.allclose(vit(x)[0, 2], plain)


def test_gradcam_on_a_vit_block_matches_an_explicit_loop():
    """Grad-CAM (Selvaraju et al. 2017, Eq. 1-2) on block 0 of a tiny ViT through as_feature_map, against a
    float64 loop over channels and patches (class token dropped, weights = mean gradient over the patch grid)."""
    vit = tiny_vit()
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    with torch.enable_grad(), probe(vit, BLOCK, layout=None) as p:
        scores, _ = target_scores(vit(x), [[0, 3], [1, 2]])
        tokens = p.activations[BLOCK]
        (grads,) = batched_grad(scores, [tokens])  # K N T D
    acts, info = as_feature_map(tokens.detach(), input_size=x.shape[-2:], patch_size=vit.patch_size)
    gmaps = torch.stack([as_feature_map(g, layout=info)[0] for g in grads])  # K N D h w
    weights = gradcam_weights(acts, gmaps)  # K N D
    cams = torch.relu(torch.einsum("knc,nchw->nkhw", weights, acts))
    assert cams.shape == (2, 2, 4, 6) and cams.abs().sum() > 0
    expect = torch.zeros(2, 2, 4, 6, dtype=torch.float64)
    gh, gw, d = 4, 6, tokens.shape[2]
    for n in range(2):
        for k in range(2):
            alpha = [sum(grads[k, n, 1 + j, c].item() for j in range(gh * gw)) / (gh * gw) for c in range(d)]
            for y in range(gh):
                for xx in range(gw):
                    expect[n, k, y, xx] = max(0.0, sum(alpha[c] * tokens[n, 1 + y * gw + xx, c].item()
                                                       for c in range(d)))
    torch.testing.assert_close(cams, expect, rtol=1e-12, atol=1e-12)
