"""Attention rollout (Abnar & Zuidema 2020) and per-head attention maps against float64 hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convscope.errors import ConvscopeError
from convscope.methods.rollout import attention_maps, attention_rollout
from convscope.models.vit import vit_b_16

from .helpers import assert_untouched, snapshot


def toy_vit() -> nn.Module:
    """Two blocks, two heads, width 4, 8 px patches: a 16 x 24 image gives a 2 x 3 grid + class token (T = 7)."""
    torch.manual_seed(0)
    model = vit_b_16(num_classes=3, image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=4, mlp_dim=8)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.7)  # sharp, varied attention (no ties for the discard)
    return model.double().eval()


def hand_attentions(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Per-head attention weights ``N x heads x T x T`` of every block, by explicit float64 operations."""
    p = model.patch_size
    n, _, h, w = x.shape
    gh, gw = h // p, w // p
    patches = x.reshape(n, 3, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, 3 * p * p)
    tokens = patches @ model.conv_proj.weight.reshape(model.hidden_dim, -1).T + model.conv_proj.bias
    tokens = torch.cat([model.class_token.expand(n, 1, -1), tokens], dim=1)
    tokens = tokens + model.encoder.position_embedding((gh, gw))
    out = []
    for blk in model.encoder.layers:
        heads, d = blk.num_heads, model.hidden_dim
        a = F.layer_norm(tokens, (d,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
        wq, wk, wv = blk.self_attention.in_proj_weight.chunk(3)
        bq, bk, bv = blk.self_attention.in_proj_bias.chunk(3)
        q, k, v = a @ wq.T + bq, a @ wk.T + bk, a @ wv.T + bv
        hd = d // heads
        weights = torch.stack([torch.softmax(q[..., i * hd:(i + 1) * hd] @ k[..., i * hd:(i + 1) * hd].transpose(1, 2)
                                             / math.sqrt(hd), dim=-1) for i in range(heads)], dim=1)
        out.append(weights)
        mixed = torch.cat([weights[:, i] @ v[..., i * hd:(i + 1) * hd] for i in range(heads)], dim=-1)
        tokens = tokens + mixed @ blk.self_attention.out_proj.weight.T + blk.self_attention.out_proj.bias
        tokens = tokens + blk.mlp(blk.ln_2(tokens))
    return out


def hand_rollout(attns: list[torch.Tensor], fusion: str, ratio: float, start: int) -> torch.Tensor:
    """Rollout by explicit loops: fuse, discard the lowest (never [0, 0]), 0.5 A + 0.5 I, row sums 1, product."""
    n, _, t, _ = attns[0].shape
    result = []
    for i in range(n):
        acc = torch.eye(t, dtype=torch.float64)
        for w in attns[start:]:
            fused = {"mean": w[i].mean(0), "max": w[i].max(0).values, "min": w[i].min(0).values}[fusion].clone()
            order = sorted(range(t * t), key=lambda j: fused.flatten()[j].item())[:int(t * t * ratio)]
            for j in order:
                if j != 0:
                    fused[j // t, j % t] = 0.0
            a_hat = torch.zeros(t, t, dtype=torch.float64)
            for r in range(t):
                row = [0.5 * fused[r, c].item() + (0.5 if r == c else 0.0) for c in range(t)]
                total = sum(row)
                for c in range(t):
                    a_hat[r, c] = row[c] / total
            acc = a_hat @ acc
        result.append(acc[0, 1:])
    return torch.stack(result)


@pytest.mark.parametrize("fusion, ratio, start", [("mean", 0.0, 0), ("mean", 0.9, 0), ("max", 0.5, 0),
                                                  ("min", 0.3, 1)])
def test_rollout_equals_hand_computation(fusion, ratio, start):
    model = toy_vit()
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    before = snapshot(model)
    got = attention_rollout(model, x, head_fusion=fusion, discard_ratio=ratio, start_layer=start, upsample=False)
    assert_untouched(model, before)
    assert all(not b.need_weights for b in model.encoder.layers)
    expect = hand_rollout(hand_attentions(model, x), fusion, ratio, start).reshape(2, 1, 2, 3)
    assert got.shape == (2, 1, 2, 3)
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)
    up = attention_rollout(model, x, head_fusion=fusion, discard_ratio=ratio, start_layer=start, target=[1, 2])
    assert up.shape == (2, 1, 16, 24)  # the target is ignored; maps at the input's size
    torch.testing.assert_close(up, F.interpolate(got, size=(16, 24), mode="bilinear", align_corners=False))


def test_rollout_discard_changes_the_map_and_no_discard_keeps_rows_stochastic():
    model = toy_vit()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    plain = attention_rollout(model, x, discard_ratio=0.0, upsample=False)
    dropped = attention_rollout(model, x, discard_ratio=0.8, upsample=False)
    assert not torch.allclose(plain, dropped)
    assert 0 < plain.sum() < 1  # the class token's row sums to 1 over all tokens, including itself


def test_attention_maps_equal_the_class_token_attention_per_head():
    model = toy_vit()
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    before = snapshot(model)
    attns = hand_attentions(model, x)
    last = attention_maps(model, x)
    first = attention_maps(model, x, layer="encoder.layers.encoder_layer_0.self_attention")
    assert_untouched(model, before)
    assert last.shape == (2, 2, 2, 3)
    torch.testing.assert_close(last, attns[1][:, :, 0, 1:].reshape(2, 2, 2, 3), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(first, attns[0][:, :, 0, 1:].reshape(2, 2, 2, 3), rtol=1e-10, atol=1e-12)
    assert attention_maps(model, x, layer="encoder.layers.encoder_layer_0", upsample=True).shape == (2, 2, 16, 24)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("call, message", [
    (lambda m, x: attention_rollout(TinyCNN(), x.float()), "has no ViT encoder block"),
    (lambda m, x: attention_maps(TinyCNN(), x.float()), "has no ViT encoder block"),
    (lambda m, x: attention_rollout(m, x, head_fusion="median"), "head_fusion"),
    (lambda m, x: attention_rollout(m, x, discard_ratio=1.0), "discard_ratio"),
    (lambda m, x: attention_rollout(m, x, start_layer=2), "start_layer"),
    (lambda m, x: attention_maps(m, x, layer="conv_proj"), "not a ViT encoder block"),
    (lambda m, x: attention_rollout(m, x[0]), "N x C x H x W"),
])
def test_bad_input_is_a_one_line_error(call, message):
    model = toy_vit()
    before = snapshot(model)
    with pytest.raises(ConvscopeError, match=message) as err:
        call(model, torch.randn(1, 3, 16, 16, dtype=torch.float64))
    assert "\n" not in str(err.value)
    assert_untouched(model, before)
