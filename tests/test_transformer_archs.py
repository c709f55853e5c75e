"""ViT-B/16 and Swin-T with torchvision's names: state-dict keys and shapes against torchvision's own listing,
strict loading, and the forward pass against float64 hand computations (no torchvision here)."""

from __future__ import annotations

import math
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from convscope.core.probe import probe
from convscope.errors import ConvscopeError
from convscope.models.swin import (
    PatchMerging,
    ShiftedWindowAttention,
    SwinTransformer,
    shifted_window_attention,
    swin_t,
)
from convscope.models.vit import VisionTransformer, need_attention_weights, rename_legacy_keys, vit_b_16

from .helpers import assert_untouched, snapshot

KEYS = Path(__file__).parent / "data" / "state_dict_keys"


def read_keys(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (KEYS / f"{name}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split()
            out[key] = tuple(int(s) for s in shape.split(","))
    return out


def tiny_vit(**kw: object) -> VisionTransformer:
    torch.manual_seed(0)
    cfg = dict(num_classes=5, image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16)
    cfg.update(kw)
    model = vit_b_16(**cfg).double().eval()
    with torch.no_grad():  # torchvision zero-initializes the head and class token: give them values
        for p in (model.heads.head.weight, model.heads.head.bias, model.class_token):
            p.normal_()
    return model


def tiny_swin(**kw: object) -> SwinTransformer:
    torch.manual_seed(0)
    cfg = dict(num_classes=5, embed_dim=12, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4])
    cfg.update(kw)
    model = swin_t(**cfg).double().eval()
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.1 * torch.randn_like(t))  # non-zero biases and a non-trivial relative position table
    return model


def no_init(t: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return t


@pytest.mark.parametrize("name, factory", [("vit_b_16", vit_b_16), ("swin_t", swin_t)])
def test_state_dict_matches_torchvision_and_loads_strictly(name, factory):
    ref = read_keys(name)
    inits = ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "zeros_", "constant_")
    with mock.patch.multiple(torch.nn.init, **dict.fromkeys(inits, no_init)):  # full size, skipping 86M draws
        model = factory()
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(own) == list(ref)  # same keys in torchvision's order
    assert own == ref
    assert sum(math.prod(s) for k, s in ref.items() if not k.endswith("_index")) == {
        "vit_b_16": 86567656, "swin_t": 28288354}[name]  # torchvision's published num_params
    state = {k: torch.full(s, i, dtype=torch.long if k.endswith("_index") else torch.float32)
             for i, (k, s) in enumerate(ref.items())}
    model.load_state_dict(state, strict=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict({**state, "head.weight" if name == "swin_t" else "heads.head.weight":
                               torch.zeros(10, 3)}, strict=True)


@pytest.mark.parametrize("factory", [tiny_vit, tiny_swin])
def test_random_state_dict_loads_strictly_and_drives_the_output(factory):
    a, b = factory(), factory()
    torch.manual_seed(1)
    state = {k: (torch.randn_like(v) if v.is_floating_point() else v.clone()) for k, v in a.state_dict().items()}
    b.load_state_dict(state, strict=True)
    a.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert torch.equal(a(x), b(x))
    with pytest.raises(RuntimeError):
        b.load_state_dict({k: v for k, v in state.items() if "head" not in k}, strict=True)


def test_legacy_vit_checkpoint_keys_are_renamed():
    model = tiny_vit()
    state = model.state_dict()
    legacy = {k.replace(".mlp.0.", ".mlp.linear_1.").replace(".mlp.3.", ".mlp.linear_2."): v for k, v in state.items()}
    assert "encoder.layers.encoder_layer_1.mlp.linear_2.bias" in legacy
    renamed = rename_legacy_keys(legacy)
    assert list(renamed) == list(state)
    model.load_state_dict(renamed, strict=True)


def test_vit_forward_matches_hand_computation():
    """Eq. 1-4 of Dosovitskiy et al. written out with unfold, explicit heads and softmax, float64."""
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)  # 4x6 patch grid: interpolated position embeddings
    D, H, p = 8, 2, 8
    patches = F.unfold(x, p, stride=p).transpose(1, 2)  # N 24 (3 p p), row-major like the conv's output
    z = patches @ model.conv_proj.weight.reshape(D, -1).T + model.conv_proj.bias
    z = torch.cat([model.class_token.expand(2, 1, D), z], 1)
    pos = model.encoder.pos_embedding
    grid = pos[:, 1:].reshape(1, 4, 4, D).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(4, 6), mode="bicubic", align_corners=True).flatten(2).transpose(1, 2)
    z = z + torch.cat([pos[:, :1], grid], 1)

    def ln(t, m):
        return (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-6) \
            * m.weight + m.bias

    for blk in model.encoder.layers:
        a = ln(z, blk.ln_1)
        att = blk.self_attention
        q, k, v = (a @ w.T + b for w, b in zip(att.in_proj_weight.chunk(3), att.in_proj_bias.chunk(3)))
        heads = []
        for h in range(H):
            sl = slice(h * D // H, (h + 1) * D // H)
            w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(D // H), -1)
            heads.append(w @ v[..., sl])
        z = z + torch.cat(heads, -1) @ att.out_proj.weight.T + att.out_proj.bias
        m = ln(z, blk.ln_2)
        hidden = F.gelu(m @ blk.mlp[0].weight.T + blk.mlp[0].bias)
        z = z + hidden @ blk.mlp[3].weight.T + blk.mlp[3].bias
    logits = ln(z, model.encoder.ln)[:, 0] @ model.heads.head.weight.T + model.heads.head.bias
    torch.testing.assert_close(model(x), logits, rtol=1e-10, atol=1e-10)


def test_vit_position_embeddings_interpolate_only_when_the_grid_differs():
    model = tiny_vit()
    enc = model.encoder
    assert enc.position_embedding((4, 4)) is enc.pos_embedding  # trained size: torchvision's exact forward
    new = enc.position_embedding((7, 5))
    assert new.shape == (1, 1 + 35, 8)
    assert torch.equal(new[:, 0], enc.pos_embedding[:, 0])  # class token's embedding kept
    old = enc.pos_embedding[0, 1:].reshape(4, 4, 8)
    grid = new[0, 1:].reshape(7, 5, 8)
    for (i, j), (a, b) in {(0, 0): (0, 0), (0, 4): (0, 3), (6, 0): (3, 0), (6, 4): (3, 3)}.items():
        torch.testing.assert_close(grid[i, j], old[a, b])  # align_corners=True keeps the corner patches
    assert model(torch.randn(1, 3, 56, 40, dtype=torch.float64)).shape == (1, 5)


@pytest.mark.parametrize("size", [(30, 32), (4, 4), (32, 36)])
def test_vit_refuses_sizes_that_are_not_patch_multiples(size):
    with pytest.raises(ConvscopeError, match="multiple of its patch size 8"):
        tiny_vit()(torch.zeros(1, 3, *size, dtype=torch.float64))


def test_vit_attention_weights_on_request_without_changing_outputs():
    model = tiny_vit().float()
    x = torch.randn(2, 3, 32, 32)
    before = snapshot(model)
    name = "encoder.layers.encoder_layer_1.self_attention"
    with torch.no_grad(), probe(model, [name, "encoder.layers.encoder_layer_0"], layout=None) as p:
        plain = model(x)
        assert p.activations[name][1] is None  # torchvision's default: no weights
        with need_attention_weights(model) as blocks:
            weighted = model(x)
        out, weights = p.activations[name]
        tokens = p.activations["encoder.layers.encoder_layer_0"]
    assert blocks == ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    assert all(not b.need_weights for b in model.encoder.layers)
    torch.testing.assert_close(weighted, plain, rtol=1e-5, atol=1e-6)
    assert weights.shape == (2, 2, 17, 17)  # N x heads x T x T, per head
    blk = model.encoder.layers[1]
    a = blk.ln_1(tokens)
    q, k, _ = (a @ w.T + b for w, b in zip(blk.self_attention.in_proj_weight.chunk(3),
                                          blk.self_attention.in_proj_bias.chunk(3)))
    for h in range(2):
        expect = torch.softmax(q[..., 4 * h:4 * h + 4] @ k[..., 4 * h:4 * h + 4].transpose(1, 2) / 2.0, -1)
        torch.testing.assert_close(weights[:, h], expect, rtol=1e-5, atol=1e-6)
    assert_untouched(model, before)
    with pytest.raises(KeyError), need_attention_weights(model):
        raise KeyError("body fails")
    assert all(not b.need_weights for b in model.encoder.layers)  # restored when the body raises
    with pytest.raises(ConvscopeError, match="no convscope ViT EncoderBlock"), need_attention_weights(tiny_swin()):
        pass


def test_swin_relative_position_index_by_explicit_loop():
    attn = ShiftedWindowAttention(8, [3, 4], [0, 0], num_heads=2)
    coords = [(y, x) for y in range(3) for x in range(4)]
    expect = [(y1 - y2 + 2) * 7 + (x1 - x2 + 3) for y1, x1 in coords for y2, x2 in coords]
    assert attn.relative_position_index.tolist() == expect
    assert attn.relative_position_bias_table.shape == (5 * 7, 2)
    assert ShiftedWindowAttention(8, [7, 7], [3, 3], 2).relative_position_index.shape == (2401,)


def explicit_window_attention(x, attn: ShiftedWindowAttention, shift: tuple[int, int]):
    """SW-MSA on N x H x W x C as one attention over all tokens of the image, in its own coordinates (no roll, no
    window partition): zero-pad to whole windows, then token i attends to j iff they fall in the same window of
    the partition offset by ``shift`` (windows cut at the border, Liu et al. Fig. 2), with bias
    table[(dy + wh - 1) * (2 ww - 1) + dx + ww - 1]; other pairs get -inf."""
    n, h, w, c = x.shape
    wh, ww = attn.window_size
    ph, pw = -(-h // wh) * wh, -(-w // ww) * ww
    xp = F.pad(x, (0, 0, 0, pw - w, 0, ph - h))
    sy = shift[0] if wh < ph else 0
    sx = shift[1] if ww < pw else 0
    heads, d = attn.num_heads, c // attn.num_heads
    coords = [(y, xx) for y in range(ph) for xx in range(pw)]
    group = [((y - sy) // wh, (xx - sx) // ww) for y, xx in coords]
    logit_add = torch.full((heads, len(coords), len(coords)), -math.inf, dtype=x.dtype)
    for i, (y1, x1) in enumerate(coords):
        for j, (y2, x2) in enumerate(coords):
            if group[i] == group[j]:
                logit_add[:, i, j] = attn.relative_position_bias_table[(y1 - y2 + wh - 1) * (2 * ww - 1)
                                                                       + x1 - x2 + ww - 1]
    qkv = (xp @ attn.qkv.weight.T + attn.qkv.bias).reshape(n, ph * pw, 3, heads, d)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # N heads T d, over the whole image
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d) + logit_add, -1)
    out = (weights @ v).transpose(1, 2).reshape(n, ph, pw, c)
    out = out @ attn.proj.weight.T + attn.proj.bias
    return out[:, :h, :w]


@pytest.mark.parametrize("size, shift", [((8, 8), (0, 0)), ((8, 8), (2, 2)), ((6, 10), (2, 2)), ((3, 10), (2, 2))])
def test_shifted_window_attention_matches_explicit_loop(size, shift):
    torch.manual_seed(0)
    attn = ShiftedWindowAttention(4, [4, 4], list(shift), num_heads=2).double()
    with torch.no_grad():
        for t in attn.parameters():
            t.normal_()
    x = torch.randn(2, *size, 4, dtype=torch.float64)
    torch.testing.assert_close(attn(x), explicit_window_attention(x, attn, shift), rtol=1e-9, atol=1e-9)
    assert attn.shift_size == list(shift)  # a map narrower than a window skips the shift without forgetting it
    y = shifted_window_attention(x, attn.qkv.weight, attn.proj.weight, attn.relative_position_bias(), [4, 4], 2,
                                 list(shift), qkv_bias=attn.qkv.bias, proj_bias=attn.proj.bias)
    torch.testing.assert_close(y, attn(x), rtol=0, atol=0)


def test_patch_merging_gathers_2x2_neighbourhoods_in_torchvision_order():
    merge = PatchMerging(2).double()
    x = torch.randn(1, 3, 5, 2, dtype=torch.float64)  # odd sizes: zero row / column added
    pad = F.pad(x, (0, 0, 0, 1, 0, 1))
    expect = torch.empty(1, 2, 3, 8, dtype=torch.float64)
    for i in range(2):
        for j in range(3):
            expect[0, i, j] = torch.cat([pad[0, 2 * i, 2 * j], pad[0, 2 * i + 1, 2 * j], pad[0, 2 * i, 2 * j + 1],
                                         pad[0, 2 * i + 1, 2 * j + 1]])
    torch.testing.assert_close(merge(x), merge.reduction(merge.norm(expect)))


def test_swin_layouts_and_sizes():
    model = tiny_swin()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    names = ["features.0.0", "features.0.2", "features.1", "features.2", "features.3", "norm", "permute"]
    with torch.no_grad(), probe(model, names, layout=None) as p:
        out = model(x)
    shapes = {n: tuple(a.shape) for n, a in p.activations.items()}
    assert shapes == {"features.0.0": (2, 12, 8, 8), "features.0.2": (2, 8, 8, 12), "features.1": (2, 8, 8, 12),
                      "features.2": (2, 4, 4, 24), "features.3": (2, 4, 4, 24), "norm": (2, 4, 4, 24),
                      "permute": (2, 24, 4, 4)}
    torch.testing.assert_close(out, model.head(p.activations["norm"].mean((1, 2))))
    for size in [(4, 4), (28, 44), (37, 21)]:  # one patch, padded windows, odd merges
        assert model(torch.randn(1, 3, *size, dtype=torch.float64)).shape == (1, 5)
    with pytest.raises(ConvscopeError, match="smaller than one patch"):
        model(torch.zeros(1, 3, 3, 8, dtype=torch.float64))
    model.train()
    torch.manual_seed(0)
    assert model(x).shape == (2, 5)  # stochastic depth active in training mode


def test_torchvision_init_and_configs():
    v = vit_b_16(num_classes=3, image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=4, mlp_dim=8,
                 representation_size=6)
    assert [n for n, _ in v.heads.named_children()] == ["pre_logits", "act", "head"]
    assert not v.heads.head.weight.any() and v.seq_length == 5
    with pytest.raises(ConvscopeError, match="not a multiple of patch_size"):
        vit_b_16(image_size=30)
    with mock.patch.object(torch.nn.init, "trunc_normal_", no_init):
        blocks = [b for b in swin_t().modules() if isinstance(b, ShiftedWindowAttention)]
    assert [b.shift_size for b in blocks[:4]] == [[0, 0], [3, 3], [0, 0], [3, 3]]
